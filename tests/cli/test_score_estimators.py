"""``gradsae score`` with the estimators of issue 23: token named, logit lens, --methods, baselines."""

from __future__ import annotations

import json

import pytest

from gradsae.cli import main
from gradsae.sae_formats import save_sae
from tests.helpers import save_tiny_hf, tiny_sae


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    folder = save_tiny_hf(root / "model", seed=1)
    save_sae(tiny_sae("topk", layer=1), root / "sae")
    return root, ["score", "--model", str(folder), "--sae", str(root / "sae"), "--no-chat", "--top", "4"]


def test_header_names_the_token_and_rows_show_the_lens(files, capsys) -> None:
    root, argv = files
    out = root / "plain.json"
    assert main([*argv, "--prompt", "hello there", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "objective: next-token p('" in text
    assert "logit lens (raises)" in text
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(len(r["lens"]) == 3 for r in rows)


def test_methods_rank_by_the_first_and_show_the_others(files, capsys) -> None:
    root, argv = files
    out = root / "est.json"
    args = [*argv, "--prompt", "hello there", "--methods", "ig,relp,gradsae", "--ig-steps", "4", "--ablation"]
    assert main([*args, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Top latents by integrated gradients" in text and "| RelP |" in text and "exact ablation" in text
    rows = json.loads(out.read_text())["rows"]
    ranked = [r for r in rows if r["rank_gradsae"]]
    assert sorted(ranked, key=lambda r: r["rank_gradsae"]) == sorted(ranked, key=lambda r: -r["influence"])
    assert all(set(r["others"]) == {"relp", "gradsae"} for r in rows)


@pytest.mark.parametrize("baseline", ["counterfactual", "mean"])
def test_baselines_run_with_every_estimator(files, capsys, baseline, monkeypatch) -> None:
    _root, argv = files
    if baseline == "mean":  # the held-out news corpus is replaced by a few tokens
        import torch

        monkeypatch.setattr(
            "gradsae.cli.score.corpus_tokens", lambda *a, **k: torch.tensor([[1, 70, 71, 72, 73, 74]] * 2)
        )
        extra = ["--baseline", "mean"]
    else:
        extra = ["--baseline", "counterfactual", "--corrupt", "jello there"]
    assert main([*argv, "--prompt", "hello there", "--methods", "ig,relp,gradsae", "--ablation", *extra]) == 0
    assert f"removal baseline: {baseline}" in capsys.readouterr().out


def test_logit_diff_objective(files, capsys) -> None:
    _root, argv = files
    extra = ["--objective", "logit-diff", "--baseline", "counterfactual", "--corrupt", "hello where"]
    assert main([*argv, "--prompt", "hello there", *extra]) == 0
    assert "logit-diff vs the greedy answer to 'hello where'" in capsys.readouterr().out
    same = ["--objective", "logit-diff", "--corrupt", "hello there"]  # the same answer: no difference to read
    assert main([*argv, "--prompt", "hello there", *same]) == 2
    assert "both continue with" in capsys.readouterr().err


def test_bad_estimator_options_are_one_line_errors(files, capsys) -> None:
    _root, argv = files
    cases = [
        (["--methods", "ig,nope"], "--methods"),
        (["--baseline", "counterfactual"], "need --corrupt"),
        (["--corrupt", "x"], "--corrupt applies"),
        (["--ig-steps", "0"], "--ig-steps"),
        (["--baseline", "counterfactual", "--corrupt", "hello there!!"], "same token length"),
    ]
    for extra, words in cases:
        assert main([*argv, "--prompt", "hello there", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and words in err and "\n" not in err
