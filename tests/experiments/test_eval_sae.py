"""``gradsae eval-sae``: each figure against plain torch, padding invariance, the three sets, error mode == clean,
and the files the command writes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from gradsae.cli import main
from gradsae.experiments.eval_sae import CARD_BEGIN, CARD_END, EvalSAEResults, SetFigures, set_figures, task_accuracy
from gradsae.experiments.eval_sets import EvalSet, build, chat_set, generated_set, news_set, task_variants
from gradsae.generate import generate_batch, pad_left
from gradsae.models import LoadedModel
from gradsae.sae import SAE, SAEConfig
from gradsae.tasks import Example, Task
from tests.helpers import BOS, D_MODEL, PAD, CharTokenizer, char_lm, tiny_sae
from tests.tiny_files import tiny_run_files

LAYER = 1
FIELDS = (
    "fvu",
    "fvu_typical",
    "outliers",
    "cossim",
    "l0",
    "dead_fraction",
    "ce_clean",
    "ce_sae",
    "ce_zero",
    "ce_recovered",
    "kl_sae",
    "kl_zero",
)


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return char_lm(init_range=0.2)


@pytest.fixture(scope="module")
def sae() -> SAE:
    return tiny_sae("topk", d_sae=48, layer=LAYER, seed=3)


def random_rows(lengths: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(32, 127, (n,), generator=gen).tolist() for n in lengths]


def ragged_set(counts: list[int] | None = None) -> EvalSet:
    """Rows of 5 to 19 tokens; ``counts``: how many last positions of each count (default: all but the first)."""
    rows = random_rows([12, 5, 19, 9, 16, 7, 14])
    counts = counts or [len(row) - 1 for row in rows]
    return build("ragged", rows, counts, ["x"] * len(rows), PAD)


# -- an independent computation -------------------------------------------------------------------------------
def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _run(lm: LoadedModel, ids: torch.Tensor, layer: int, fn: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One unpadded row: logits ``[pos, vocab]`` and the residual after ``layer`` (before any replacement)."""
    seen = {}

    def hook(_m: Any, _i: Any, output: Any) -> Any:
        z = _hidden(output)
        seen["z"] = z
        if fn is None:
            return None
        new = z.clone()
        new[:, 1:] = fn(z[:, 1:])
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = lm.layers[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = lm.model(input_ids=ids).logits[0]
    finally:
        handle.remove()
    return logits, seen["z"][0]


def by_hand(lm: LoadedModel, sae: SAE, evalset: EvalSet, layer: int = LAYER, factor: float = 10.0) -> dict[str, float]:
    """The figures from one row at a time, no padding: plain torch and the formulas of the module docstring."""
    xs, ce, kl = [], {"clean": [], "sae": [], "zero": []}, {"sae": [], "zero": []}
    for ids, mask, counted in zip(evalset.input_ids, evalset.attention_mask, evalset.counted, strict=True):
        row = ids[mask.bool()][None]
        where = counted[mask.bool()].nonzero().flatten().tolist()
        clean, z = _run(lm, row, layer)
        xs.append(z[where])
        lp = {"clean": clean.log_softmax(-1)}
        lp["sae"] = _run(lm, row, layer, lambda x: sae(x))[0].log_softmax(-1)
        lp["zero"] = _run(lm, row, layer, torch.zeros_like)[0].log_softmax(-1)
        for p in (p for p in where if p < row.shape[1] - 1):
            target = int(row[0, p + 1])
            for name in ce:
                ce[name].append(-float(lp[name][p, target]))
            for name in kl:
                kl[name].append(float((lp["clean"][p].exp() * (lp["clean"][p] - lp[name][p])).sum()))
    x = torch.cat(xs).double()
    with torch.no_grad():
        h = sae.encode(x.float()).double()
        out = sae(x.float()).double()
    mean = {name: sum(values) / len(values) for name, values in {**ce, **{f"kl_{k}": v for k, v in kl.items()}}.items()}
    typical = x.norm(dim=-1) <= factor * x.norm(dim=-1).median()
    xt = x[typical]
    return {
        "fvu": float((x - out).pow(2).sum() / (x - x.mean(0)).pow(2).sum()),
        "fvu_typical": float((xt - out[typical]).pow(2).sum() / (xt - xt.mean(0)).pow(2).sum()),
        "outliers": int((~typical).sum()),
        "cossim": float(torch.nn.functional.cosine_similarity(x, out, dim=-1).mean()),
        "l0": float((h > 0).sum(-1).double().mean()),
        "dead_fraction": float(((h > 0).sum(0) == 0).double().mean()),
        "ce_clean": mean["clean"],
        "ce_sae": mean["sae"],
        "ce_zero": mean["zero"],
        "ce_recovered": (mean["zero"] - mean["sae"]) / (mean["zero"] - mean["clean"]),
        "kl_sae": mean["kl_sae"],
        "kl_zero": mean["kl_zero"],
        "tokens": x.shape[0],
        "predictions": len(ce["clean"]),
    }


def close(a: SetFigures, b: SetFigures | dict[str, float], rel: float = 1e-4) -> None:
    other = dataclasses.asdict(b) if isinstance(b, SetFigures) else b
    for name in FIELDS:
        assert getattr(a, name) == pytest.approx(other[name], rel=rel, abs=1e-6), name


# -- figures ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("partial", [False, True], ids=["all positions", "last positions only"])
def test_each_figure_matches_a_direct_computation(lm, sae, partial) -> None:
    counts = [3, 1, 7, 4, 2, 6, 5] if partial else None
    evalset = ragged_set(counts)
    assert not evalset.attention_mask.all()  # the rows really are padded
    (figures,) = set_figures(lm, {LAYER: sae}, evalset, batch=3)
    expected = by_hand(lm, sae, evalset)
    close(figures, expected)
    assert figures.tokens == expected["tokens"] == evalset.tokens and figures.sequences == 7
    assert figures.predictions == expected["predictions"]
    assert 0 < figures.dead_fraction < 1 and figures.kl_sae > 0 and figures.ce_zero != figures.ce_clean


def test_typical_fvu_leaves_out_the_large_norms(lm, sae, monkeypatch) -> None:
    import gradsae.experiments.eval_sae

    monkeypatch.setattr(gradsae.experiments.eval_sae, "TYPICAL", 1.0)  # everything above the median is left out
    evalset = ragged_set()
    (figures,) = set_figures(lm, {LAYER: sae}, evalset, batch=3)
    expected = by_hand(lm, sae, evalset, factor=1.0)
    assert figures.outliers == expected["outliers"] and 0.4 * evalset.tokens < figures.outliers < 0.6 * evalset.tokens
    assert (
        figures.fvu_typical == pytest.approx(expected["fvu_typical"], rel=1e-4) and figures.fvu_typical != figures.fvu
    )


def test_padding_and_order_change_no_figure(lm, sae) -> None:
    evalset = ragged_set()
    padded = set_figures(lm, {LAYER: sae}, evalset, batch=4)[0]
    alone = set_figures(lm, {LAYER: sae}, evalset, batch=1)[0]
    wide = EvalSet(
        name="wide",
        input_ids=torch.cat([torch.full((7, 6), PAD), evalset.input_ids.flip(0)], dim=1),
        attention_mask=torch.cat([torch.zeros(7, 6, dtype=torch.long), evalset.attention_mask.flip(0)], dim=1),
        counted=torch.cat([torch.zeros(7, 6, dtype=torch.bool), evalset.counted.flip(0)], dim=1),
        sources={},
    )
    shuffled = set_figures(lm, {LAYER: sae}, wide, batch=7)[0]
    close(padded, alone, rel=1e-5)
    close(shuffled, alone, rel=1e-5)


def test_an_exact_sae_recovers_everything(lm) -> None:
    sae = SAE(SAEConfig(d_in=D_MODEL, d_sae=2 * D_MODEL, activation="relu"))
    eye = torch.eye(D_MODEL)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
    (figures,) = set_figures(lm, {0: sae}, ragged_set(), batch=4)
    assert figures.fvu == pytest.approx(0, abs=1e-6) and figures.kl_sae == pytest.approx(0, abs=1e-6)
    assert figures.ce_recovered == pytest.approx(1, abs=1e-5) and figures.ce_sae == pytest.approx(figures.ce_clean)
    assert figures.kl_zero > 0


# -- the sets --------------------------------------------------------------------------------------------------
class ChatCharTokenizer(CharTokenizer):
    """The character tokenizer with a chat template, so the chat rendering differs from the plain one."""

    chat_template = "user/assistant"

    def apply_chat_template(self, messages: list[dict[str, str]], **_: Any) -> str:
        return "".join(f"<{m['role']}> {m['content']} </{m['role']}>" for m in messages) + "<assistant>"


def tiny_task(name: str = "t", fmt: str = "plain") -> Task:
    examples = tuple(Example(id=f"{name}{i}", prompt=word, answers=(word[::-1],)) for i, word in enumerate(WORDS))
    return Task(name, "R: {prompt} ->", examples, max_new_tokens=4, metric="squad", prompt_format=fmt)  # type: ignore[arg-type]


WORDS = ("cat", "sun", "tree", "milk", "stone", "bird", "fish", "rain")


def test_chat_set_holds_the_prompts_as_the_tasks_render_them() -> None:
    tok = ChatCharTokenizer()
    variants = task_variants(["capitals"], seed=0, pool=5)
    assert [v.name for v in variants] == ["capitals", "capitals-chat"]
    evalset = chat_set(tok, variants, tokens=10**6)
    assert evalset.input_ids.shape[0] == 10 and set(evalset.sources) == {"capitals", "capitals-chat"}
    texts = sorted(v.render(e, tok) for v in variants for e in v.examples)
    assert any(text.startswith("<user>") for text in texts) and any(text.startswith("Country") for text in texts)
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(evalset.input_ids, evalset.attention_mask, strict=True)]
    assert all(row[0] == BOS for row in rows)
    assert sorted(tok.decode(row[1:]) for row in rows) == sorted(
        t.replace("\n", "") for t in texts
    )  # no \n in its vocab
    assert evalset.tokens == sum(len(row) - 1 for row in rows)  # every position but the first counts
    assert task_variants(["capitals"], seed=0, pool=5)[0].examples == variants[0].examples
    assert task_variants(["capitals"], seed=1, pool=5)[0].examples != variants[0].examples


def test_chat_set_stops_at_the_budget_taking_turns() -> None:
    tok = CharTokenizer()
    evalset = chat_set(tok, [tiny_task("a"), tiny_task("b", "chat")], tokens=40)
    assert 40 <= evalset.tokens < 40 + 12 and evalset.sources.keys() == {"a", "b"}


def test_news_set_is_the_training_evaluation() -> None:
    from gradsae.training.activations import heldout_tokens

    texts = ["the quick brown fox jumps over the lazy dog " * 3, "hello world, a tiny corpus " * 4]
    evalset = news_set(CharTokenizer(), texts, tokens=45, context=16)
    assert torch.equal(evalset.input_ids, heldout_tokens(CharTokenizer(), texts, context=16, n_sequences=3))
    assert evalset.tokens == 45 and not evalset.counted[:, 0].any() and evalset.counted[:, 1:].all()


def test_generated_set_counts_only_the_model_s_own_continuations(lm) -> None:
    heldout = ["the quick brown fox jumps over the lazy dog", "a short one", "zebras and lions on the plains"]
    evalset = generated_set(lm, heldout, [tiny_task()], tokens=40, new_tokens=5, opening=8, batch=2)
    assert evalset.tokens >= 40 and {"news", "t"} <= evalset.sources.keys()
    for ids, mask, counted in zip(evalset.input_ids, evalset.attention_mask, evalset.counted, strict=True):
        row, keep = ids[mask.bool()], counted[mask.bool()]
        n = int(keep.sum())
        assert 1 <= n <= 5 and keep[-n:].all() and not keep[:-n].any()
        prompt_ids, prompt_mask = pad_left([row[:-n].tolist()], PAD)
        (again,) = generate_batch(lm, prompt_ids, prompt_mask, max_new_tokens=5)
        assert list(again.token_ids) == row[-n:].tolist()


# -- task accuracy -----------------------------------------------------------------------------------------------
def test_error_mode_answers_equal_the_clean_model_s(lm, sae) -> None:
    task = tiny_task()
    other = tiny_sae(d_sae=48, layer=0, seed=5)
    rows = task_accuracy(lm, {0: other, LAYER: sae}, task, batch_size=3)
    assert [(a.condition, a.layer) for a in rows] == [
        ("clean", None),
        ("replace", 0),
        ("error", 0),
        ("replace", LAYER),
        ("error", LAYER),
    ]
    clean = rows[0]
    for a in rows[1:]:
        assert a.exact.n == len(task.examples)
        if a.condition == "error":
            assert a.differs == 0 and a.per_example == clean.per_example
    assert sum(a.differs for a in rows if a.condition == "replace") > 0  # the check can fail: replace changes answers


# -- the command -----------------------------------------------------------------------------------------------
def test_command_writes_json_and_markdown(tmp_path: Path) -> None:
    d = tiny_run_files(tmp_path)
    argv = ["eval-sae", "--model", str(d / "model"), "--sae", str(d / "sae"), "--layers", "0", "--out", str(d / "o")]
    argv += ["--tokens", "120", "--n-task", "4", "--tasks", "capitals,plural", "--new-tokens", "4", "--context", "16"]
    assert main(argv) == 0
    data = json.loads((d / "o" / "eval_sae.json").read_text())
    results = EvalSAEResults.load(d / "o")
    assert (
        json.loads(json.dumps(results.to_json())) == data and EvalSAEResults.load(d / "o" / "eval_sae.json") == results
    )
    assert [(f.set, f.layer) for f in results.figures] == [("news", 0), ("chat", 0), ("generated", 0)]
    assert all(f.tokens >= 120 for f in results.figures) and data["sets"]["generated"]["sources"]["news"] > 0
    assert {(a.task, a.condition) for a in results.accuracy} == {
        (t, c) for t in ("capitals", "plural") for c in ("clean", "replace", "error")
    }
    assert all(a.differs == 0 for a in results.accuracy if a.condition == "error")
    # the tiny tokenizer has no chat template: a chat rendering would repeat the plain prompt, so none is made
    assert data["config"]["variants"] == ["capitals", "plural"]
    assert data["versions"]["torch"] == torch.__version__ and results.seconds > 0
    md = (d / "o" / "eval_sae.md").read_text()
    needles = ("| 0 | news |", "| 0 | generated |", "| capitals | exact match | 4 |", "gradsae eval-sae")
    needles += ("no chat template",)
    for needle in needles:
        assert needle in md
    fvu = next(f.fvu for f in results.figures if f.set == "chat")
    assert f"| 0 | chat | {fvu:.3f} |" in md


def test_cards_write_each_layer_s_section_once(tmp_path: Path) -> None:
    d = tiny_run_files(tmp_path)
    card = d / "sae" / "README.md"
    card.write_text("# my SAE\n\nTrained on news.\n")
    argv = ["eval-sae", "--model", str(d / "model"), "--sae", str(d / "sae"), "--layers", "0", "--out", str(d / "o")]
    argv += ["--tokens", "40", "--n-task", "2", "--tasks", "capitals", "--new-tokens", "2", "--context", "16"]
    assert main([*argv, "--cards"]) == 0
    first = card.read_text()
    fvu = next(f.fvu for f in EvalSAEResults.load(d / "o").figures if f.set == "generated")
    assert first.startswith("# my SAE\n\nTrained on news.\n") and f"| 0 | generated | {fvu:.3f} |" in first
    assert "| capitals | exact match | 2 |" in first and "layer 0 replace" in first
    assert main([*argv, "--out", str(d / "o2"), "--cards"]) == 0
    again = card.read_text()
    assert again.count(CARD_BEGIN) == 1 and again.count(CARD_END) == 1, "a rerun replaces the section"
    assert again.startswith("# my SAE\n\nTrained on news.\n")


def test_cards_without_sae_folders_are_refused_first(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["eval-sae", "--out", str(tmp_path / "o"), "--cards"]) == 2
    err = capsys.readouterr().err
    assert "--cards" in err and "--sae" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_prompt_format_renders_every_task_in_it(tmp_path: Path) -> None:
    d = tiny_run_files(tmp_path)
    argv = ["eval-sae", "--model", str(d / "model"), "--sae", str(d / "sae"), "--layers", "0", "--out", str(d / "o")]
    argv += ["--tokens", "40", "--n-task", "2", "--tasks", "sst2,capitals", "--new-tokens", "2", "--context", "16"]
    assert main([*argv, "--prompt-format", "plain"]) == 0
    results = EvalSAEResults.load(d / "o")
    assert results.config["variants"] == ["sst2-plain", "capitals-plain"]
    assert {a.task for a in results.accuracy} == {"sst2-plain", "capitals-plain"}
    md = (d / "o" / "eval_sae.md").read_text()
    assert "--prompt-format plain" in results.config["command"] and "every task in the `plain` format" in md
    assert "default format" not in md
