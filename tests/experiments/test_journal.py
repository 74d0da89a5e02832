"""The run journal: finished units survive an interruption, a rerun skips them and ends byte-identical.

Also: a damaged entry is recomputed, another configuration is refused (``--restart``
starts fresh), and a second run into the same folder is refused while the first holds it.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

import gradsae.experiments.perturb as perturb
from gradsae import _files
from gradsae.errors import GradSAEError
from gradsae.experiments.config import ExperimentConfig
from gradsae.experiments.journal import FOLDER, Journal, count_units, unit_key
from gradsae.experiments.run import run_layer
from gradsae.experiments.tasks import Example, Task
from tests import helpers

PROMPTS = ["hello there", "abc", "the quick fox", "zebra", "mnop qr", "why not"]


def test_put_get_and_damage(tmp_path):
    journal = Journal.open(tmp_path, {"seed": 0})
    assert journal.get("a") is None
    assert journal.put("a", {"x": (1, 2), "y": 0.1}) == {"x": [1, 2], "y": 0.1}
    assert journal.get("a") == {"x": [1, 2], "y": 0.1} and len(journal) == 1
    path = tmp_path / FOLDER / "a.json"
    path.write_text(path.read_text().replace("0.1", "0.2"))
    assert journal.get("a") is None  # checksum mismatch: recomputed, never trusted
    path.write_text(path.read_text()[:20])
    assert journal.get("a") is None  # torn (cannot happen with atomic writes, but still refused)
    assert Journal.open(tmp_path, {"seed": 0}).fingerprint == journal.fingerprint
    assert unit_key(6, "masking", "gradsae", "top", "50%") == "6-masking-gradsae-top-50%"


def test_another_config_is_refused(tmp_path):
    Journal.open(tmp_path, {"seed": 0, "ks": ("1", "50%")})
    Journal.open(tmp_path, {"seed": 0, "ks": ["1", "50%"]})  # the same after JSON
    with pytest.raises(GradSAEError, match=r"another configuration \(seed: 0 there, 1 now\).*--restart"):
        Journal.open(tmp_path, {"seed": 1, "ks": ("1", "50%")})


def test_lock_refuses_a_second_holder_and_cleans_up(tmp_path):
    folder = tmp_path / "run"
    with _files.locked_folder(folder, command="reproduce"):
        assert (folder / _files.LOCK).read_text().strip().isdigit()
        with (
            pytest.raises(GradSAEError, match=r"in use by another `gradsae reproduce` \(pid \d+\)"),
            _files.locked_folder(folder, command="reproduce"),
        ):
            pass
    assert not folder.exists()  # made by the lock and left empty: removed
    with _files.locked_folder(folder, command="reproduce"):
        (folder / "result.txt").write_text("kept")
    assert (folder / "result.txt").exists()


def _task(lm, sae, cfg):
    """Half the prompts answered as the spliced model answers them (kept), two labels for donors."""
    probe = Task("t", "{prompt}", tuple(Example(str(i), p, ("?",)) for i, p in enumerate(PROMPTS)), 5, "squad")
    texts = [probe.render(e) for e in probe.examples]
    gens = perturb.decode(lm, perturb.prompt_batches(lm, texts, cfg, reuse=False), probe, cfg, sae=sae, edits_for=None)
    examples = [
        Example(str(i), p, (probe.parse(g.text) if i % 2 == 0 else "never",), group=f"g{i // 4}")
        for i, (p, g) in enumerate(zip(PROMPTS, gens, strict=True))
    ]
    return dataclasses.replace(probe, examples=tuple(examples))


class _StopError(Exception):
    pass


def test_interrupted_layer_resumes_to_the_same_result(tmp_path, monkeypatch):
    lm, sae = helpers.char_lm(seed=3), helpers.tiny_sae("topk", d_sae=48, seed=2)
    cfg = ExperimentConfig(layer=0, ks=(1, "50%"), steer_positions=("last",), batch_size=3, bootstrap=50)
    task = _task(lm, sae, cfg)
    plain = run_layer(lm, sae, task, cfg)
    whole = run_layer(lm, sae, task, cfg, Journal.open(tmp_path / "a", {"run": 1}))
    assert json.dumps(dataclasses.asdict(whole)) == json.dumps(dataclasses.asdict(plain))
    assert plain.n_kept >= 2 and plain.steering, "the task must exercise both experiments"

    calls = {"n": 0}
    real = perturb.decode

    def counting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 9:
            raise _StopError
        return real(*args, **kwargs)

    monkeypatch.setattr(perturb, "decode", counting)
    with pytest.raises(_StopError):
        run_layer(lm, sae, task, cfg, Journal.open(tmp_path / "b", {"run": 1}))
    assert count_units(tmp_path / "b") == 8  # 8 conditions finished, the 9th was cut
    calls["n"] = -100
    resumed = run_layer(lm, sae, task, cfg, Journal.open(tmp_path / "b", {"run": 1}))
    total = len(plain.perturbation) + len(plain.steering)
    assert calls["n"] == -100 + total - 8  # only the unfinished conditions ran again
    assert json.dumps(dataclasses.asdict(resumed)) == json.dumps(dataclasses.asdict(plain))
    calls["n"] = -100
    assert run_layer(lm, sae, task, cfg, Journal.open(tmp_path / "b", {"run": 1})) == resumed
    assert calls["n"] == -100  # a finished layer is not recomputed at all
