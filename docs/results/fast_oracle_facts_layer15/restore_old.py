"""Replace scores.ablation_effects' call of gradsae.oracle by the pre-oracle loop (5bcb3cf^), in place."""

import sys
from pathlib import Path

path = Path(sys.argv[1])
s = path.read_text()
old = """        fixed = _pinned(objective, run.token, row)
        y = oracle.ablation_effects(
            lm, sae, ids, mask, fixed, latents, layer=layer, mode=mode, batch_size=batch_size, skip_first=skip_first
        )
        effects[row, latents] = y.to(effects.dtype)
    return effects
"""
new = """        from gradsae.prefix import compute_prefix
        from gradsae.splice import Edit

        prefix = compute_prefix(lm, ids, mask, layer)
        fixed = _pinned(objective, run.token, row)
        for start in range(0, len(latents), batch_size):
            chunk = latents[start : start + batch_size]
            edit = Edit(latents=torch.cat([chunk.new_full((1,), -1), chunk])[:, None])
            y = _old_objective_with_edit(lm, sae, prefix, mask, fixed, edit, mode=mode, skip_first=skip_first)
            effects[row, chunk] = (y[0] - y[1:]).to(effects.dtype)
    return effects


def _old_objective_with_edit(lm, sae, prefix, attention_mask, objective, edit, *, mode, skip_first=True):
    from gradsae.prefix import replay_prefix

    m = edit.latents.shape[0]
    copies = prefix.expand(m)
    with splice(lm, sae, prefix.layer, mode=mode, edits=[edit], record=False, skip_first=skip_first), \\
            replay_prefix(lm, copies), torch.no_grad():
        return objective_value(lm, copies.input_ids, attention_mask.expand(m, -1), objective)
"""
assert old in s, "the call site changed: update restore_old.py"
s = s.replace(old, new)
path.write_text(s)
print("restored the pre-oracle ablation loop in", path)
