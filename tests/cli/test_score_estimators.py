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


def test_every_estimator_and_the_oracle_ranked_side_by_side(files, capsys) -> None:
    root, argv = files
    out, page = root / "side.json", root / "side.html"
    methods = "gradsae,ig,relp,ablation"
    args = [*argv, "--prompt", "hello there", "--methods", methods, "--ig-steps", "4"]
    assert main([*args, "--json", str(out), "--html", str(page)]) == 0
    text = capsys.readouterr().out
    assert "## Rankings side by side" in text
    assert "| rank | GradSAE | integrated gradients | RelP | exact ablation | activation |" in text
    assert "Recall of the exact top-4 (ablation): GradSAE " in text
    data = json.loads(out.read_text())
    rankings = data["rankings"]
    assert list(rankings) == ["gradsae", "ig", "relp", "ablation", "activation"]
    exact = {r["latent"]: r["ablation"] for r in data["rows"]}
    for rows in rankings.values():
        scores = [s for _, s in rows]
        assert rows and scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)
    for latent, score in rankings["ablation"]:
        assert latent not in exact or abs(exact[latent] - score) <= 1e-6 * abs(score)
    shown = json.loads(page.read_text().split('id="gradsae-data">')[1].split("</script>")[0])
    assert set(shown["layers"][0]["examples"][0]["top"]) == set(rankings)  # the page can show each ranking


def test_ablation_can_rank_the_table(files, capsys) -> None:
    _root, argv = files
    assert main([*argv, "--prompt", "hello there", "--methods", "ablation,gradsae"]) == 0
    text = capsys.readouterr().out
    assert "Top latents by exact ablation" in text and "| exact ablation | GradSAE |" in text


@pytest.fixture(scope="module")
def three_layers(tmp_path_factory):
    root = tmp_path_factory.mktemp("layers")
    folder = save_tiny_hf(root / "model", seed=1, layers=3)
    for layer in range(3):
        save_sae(tiny_sae("topk", layer=layer, seed=layer), root / f"sae_{layer}")
    return root, ["score", "--model", str(folder), "--no-chat", "--prompt", "hello there"]


def test_layers_rank_across_layers_as_each_layer_alone(three_layers, capsys) -> None:
    """--layers 0,1,2 (one backward): each latent's score is the one-layer score's, and one ranking merges them."""
    root, argv = three_layers
    sae = str(root / "sae_{layer}")
    out = root / "together.json"
    assert main([*argv, "--sae", sae, "--layers", "0,1,2", "--top", "12", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "layers 0, 1, 2 (one forward, one backward)" in text and "## Top latents across layers by GradSAE" in text
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 12 and all(r["id"] == f"L{r['layer']}/{r['latent']}" for r in rows)
    assert [r["influence"] for r in rows] == sorted((r["influence"] for r in rows), reverse=True)
    alone = {}
    for layer in range(3):
        path = root / f"alone_{layer}.json"
        one = [*argv, "--sae", str(root / f"sae_{layer}"), "--layer", str(layer), "--top", "100", "--lens", "0"]
        assert main([*one, "--json", str(path)]) == 0
        for r in json.loads(path.read_text())["rows"]:
            if r["rank_gradsae"]:
                alone[(layer, r["latent"])] = r["influence"]
    capsys.readouterr()
    assert len({r["layer"] for r in rows}) >= 2
    for r in rows:
        assert abs(r["influence"] - alone[(r["layer"], r["latent"])]) <= 1e-5 * abs(r["influence"])
    best = sorted(alone.values(), reverse=True)[:12]
    assert [r["influence"] for r in rows] == pytest.approx(best, rel=1e-5)


def test_layers_refuses_what_one_backward_cannot_do(three_layers, capsys) -> None:
    root, argv = three_layers
    sae = ["--sae", str(root / "sae_{layer}")]
    cases = [
        ([*sae, "--layers", "0,1", "--methods", "gradsae,ig"], "one backward for every layer scores gradsae only"),
        ([*sae, "--layers", "0,1", "--ablation"], "--ablation with --layers"),
        ([*sae, "--layers", "0,1", "--mode", "replace"], "error mode"),
        ([*sae, "--layers", "0,1", "--layer", "1"], "--layers and --layer"),
        ([*sae, "--layers", "0,1", "--html", str(root / "x.html")], "--html shows one layer"),
        ([*sae, "--layers", "0,0"], "twice"),
        ([*sae, "--layers", "0,7"], "out of range"),
        (["--sae", str(root / "sae_0"), "--layers", "0,1"], "put {layer} in its path"),
        ([*sae, "--layers", "0,1", "--baseline", "mean"], "--baseline with --layers"),
    ]
    for extra, words in cases:
        assert main([*argv, *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and words in err and "\n" not in err, err
