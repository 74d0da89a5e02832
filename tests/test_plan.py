"""``--plan``: the cost arithmetic of :mod:`gradsae.plan`, its fit, and the CLI that prints it without running."""

from __future__ import annotations

import json

import pytest
import torch

from gradsae import plan
from gradsae.cli import main
from gradsae.plan import Costs
from gradsae.sae_formats import save_sae
from tests.helpers import char_lm, save_tiny_hf, tiny_sae


def costs(**kwargs: float) -> Costs:
    values = {
        "model": "m",
        "device": "cpu",
        "threads": 2,
        "n_layers": 10,
        "layer": 3,
        "forward_s_per_token": 0.01,
        "forward_s_per_token2": 1e-5,
        "encode_s_per_token_weight": 1e-9,
        "work_mib_per_token_layer": 0.05,
        "work_mib_per_token2_layer": 1e-4,
        "base_mib": 500.0,
        "load_s": 2.0,
    }
    values.update(kwargs)
    return Costs(**values)  # type: ignore[arg-type]


def test_score_plan_is_the_hand_computed_sum():
    c = costs()
    tokens = [100, 300]
    got = plan.plan_score(c, tokens, layer=5, d_in=8, d_sae=64)
    back = (10 - 5 - 1) / 10

    def one(n: int) -> float:  # F(n) (1 + B / L) + e n d_in d_sae, by hand
        return (0.01 * n + 1e-5 * n * n) * (1 + back) + 1e-9 * n * 8 * 64

    assert got.seconds == pytest.approx(2.0 + one(100) + one(300), rel=1e-12)
    sae = (2 * 8 * 64 + 64 + 8) * 4 / 2**20
    work = 4 * (0.05 * 300 + 1e-4 * 300**2)  # the longest prompt; 4 blocks after layer 5
    assert got.peak_mib == pytest.approx(500.0 + sae + work, rel=1e-12)
    assert "predicted wall time" in got.text("x") and "nothing was run" in got.text("x")


def test_reproduce_plan_counts_the_passes():
    c = costs(encode_s_per_token_weight=0.0)
    got = plan.plan_reproduce(
        c, [50], layer=3, d_in=8, d_sae=64, new_tokens=4, masking=7, steering=5, steer_all=1, batch=2
    )
    f, a = 0.01 * 50 + 1e-5 * 2500, 0.01  # a prompt forward; one generated token (a token-forward)
    keep = f + 4 * a
    ranking = f * (1 + 6 / 10)
    masking = 7 * (f * 7 / 10 + 4 * a)
    steering = 4 * 2 * 4 * a + 1 * (f * 7 / 10 + 4 * a) + f  # 4 at the last position, 1 at every one, shared pass
    assert got.seconds == pytest.approx(2.0 + keep + ranking + masking + steering, rel=1e-12)
    assert got.peak_mib == pytest.approx(500.0 + plan.sae_mib(8, 64) + 2 * 6 * (0.05 * 50 + 1e-4 * 2500))
    replace = plan.plan_reproduce(
        c,
        [50],
        layer=3,
        d_in=8,
        d_sae=64,
        new_tokens=4,
        masking=7,
        steering=5,
        steer_all=1,
        batch=2,
        spliced_decode=True,
    )
    assert replace.seconds == pytest.approx(got.seconds + keep, rel=1e-12)


def test_reproduce_plan_with_a_pilot_is_the_hand_computed_sum():
    """The measured keep filter and ranking, then masking and steering of the kept examples only (masked
    prompts from each set's first change, masked answers whole, steered ones until answered), scaled by
    the filter's measured over predicted time."""
    c = costs(encode_s_per_token_weight=0.0)
    pilot = plan.Pilot(
        seconds=3.0, generated=(4, 2, 3), kept=(0, 2), answer_steps=(1, 2), rank_seconds=1.5, masked_columns=(90, 40)
    )
    shape = {"layer": 3, "d_in": 8, "d_sae": 64, "new_tokens": 4, "masking": 7, "steering": 5, "steer_all": 1}
    got = plan.plan_reproduce(c, [50, 60, 70], batch=2, pilot=pilot, **shape)  # type: ignore[arg-type]
    a = 0.01

    def f(n: int) -> float:
        return 0.01 * n + 1e-5 * n * n

    def rest(n: int, columns: int, g: int, h: int) -> float:  # 7 masked, 4 steered at the last position, 1 everywhere
        return f(n) * columns / n * 0.7 + 7 * g * a + 4 * 2 * h * a + (f(n) * 0.7 + h * a) + f(n)

    scale = 3.0 / (f(50) + 4 * a + f(60) + 2 * a + f(70) + 3 * a)
    assert plan.pilot_scale(c, [50, 60, 70], pilot, spliced_decode=False) == pytest.approx(scale, rel=1e-12)
    expected = 2.0 + 3.0 + 1.5 + scale * (rest(50, 90, 4, 1) + rest(70, 40, 3, 2))
    assert got.seconds == pytest.approx(expected, rel=1e-12)
    bound = plan.plan_reproduce(c, [50, 60, 70], batch=2, **shape)  # type: ignore[arg-type]
    assert bound.peak_mib == got.peak_mib  # memory does not depend on the pilot


def test_pilot_keeps_what_the_run_keeps_and_counts_the_masked_columns():
    """The pilot is the run's own keep filter and ranking: the same kept examples and rankings; each masked
    set's first change is the first prompt column where one of its latents is active, read here from a
    spliced pass over the prompt alone."""
    from gradsae.experiments.pilot import run_pilot
    from gradsae.experiments.rank import chosen, rank_examples
    from gradsae.experiments.run import keep_filter, run_layer
    from gradsae.generate import encode_prompts
    from gradsae.models import position_ids
    from gradsae.splice import splice
    from tests.experiments.test_run import _cfg, _half_right_task

    lm, sae = char_lm(seed=4), tiny_sae("topk", d_sae=48, seed=2)
    cfg = _cfg(ks=(1, 3), steer_positions=("last",), mode="error")
    task, _ = _half_right_task(lm, sae, cfg)
    pilot = run_pilot(lm, sae, task, cfg)
    result = run_layer(lm, sae, task, cfg)
    assert len(pilot.kept) == result.n_kept and 0 < result.n_kept < len(task.examples)
    assert len(pilot.generated) == len(task.examples) and pilot.seconds > 0 and pilot.rank_seconds > 0
    assert all(1 <= s <= pilot.generated[i] for s, i in zip(pilot.answer_steps, pilot.kept, strict=True))
    texts, _, spliced, _ = keep_filter(lm, sae, task, cfg)
    examples = [task.examples[i] for i in pilot.kept]
    ranked, _ = rank_examples(lm, sae, task, examples, [spliced[i] for i in pilot.kept], cfg)
    for n, i in enumerate(pilot.kept):
        ids, mask = encode_prompts(lm.tokenizer, [texts[i]])
        with splice(lm, sae, cfg.layer, mode="error", record=True) as sp, torch.no_grad():
            lm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask))
        dense = sp.latents[0].to_dense()[0]  # [pos, d_sae] at the spliced positions
        width = ids.shape[1]
        total = 1  # K = 0: the last column only
        for method in cfg.methods:
            for which in ("top", "bottom"):
                for k in cfg.ks:
                    latents = chosen(ranked[n], method, which, k)
                    active = [int(p) for p in range(width) if any(float(dense[p, c]) > 0 for c in latents)]
                    total += width - min([width - 1, *active])
        assert pilot.masked_columns[n] == total


def test_fit_recovers_linear_and_quadratic_terms():
    n = [64, 128, 512, 2048]
    a, b = plan.fit_linear_quadratic(n, [3e-3 * x + 2e-7 * x * x for x in n])
    assert a == pytest.approx(3e-3, rel=1e-9) and b == pytest.approx(2e-7, rel=1e-6)
    a, b = plan.fit_linear_quadratic(n, [3e-3 * x - 1e-9 * x * x for x in n])  # a negative b is dropped
    assert b == 0.0 and a > 0


def test_benchmark_fit_predicts_rows_made_by_the_model():
    """Rows generated from known costs are fitted back, and the plan predicts a held-out length."""
    from benchmarks.planning import fit_costs, held_out, plan_figures

    truth = costs(n_layers=30, layer=6, base_mib=900.0)
    d_in, shipped = 16, 32

    def row(axis: str, n: int, d_sae: int) -> dict[str, float | int | str]:
        plain = plan.forward_s(truth, n) * (1 + 23 / 30)
        return {
            "axis": axis,
            "tokens": n,
            "d_sae": d_sae,
            "plain_s": plain,
            "gradsae_s": plain + truth.encode_s_per_token_weight * n * d_in * d_sae,
            "gradsae_peak_mib": plan.work_mib(truth, n, layer=6),
            "plain_peak_mib": plan.work_mib(truth, n, layer=6),
            "baseline_mib": 900.0 + plan.sae_mib(d_in, shipped),
        }

    rows = [row("length", n, shipped) for n in (64, 256, 1024, 4096)] + [row("width", 512, 1 << 20)]
    meta = {"model": "m", "device": "cpu", "threads": 2, "n_layers": 30, "layer": 6, "d_in": d_in, "load_s": 1.0}
    fitted = fit_costs(rows, shipped_d_sae=shipped, **meta)
    assert fitted.forward_s_per_token == pytest.approx(truth.forward_s_per_token, rel=1e-6)
    assert fitted.encode_s_per_token_weight == pytest.approx(truth.encode_s_per_token_weight, rel=1e-6)
    assert fitted.work_mib_per_token_layer == pytest.approx(truth.work_mib_per_token_layer, rel=1e-6)
    assert fitted.base_mib == pytest.approx(900.0)
    fit_rows, test = held_out(rows)
    assert [r["tokens"] for r in test] == [4096] and len(fit_rows) == 4
    figures = plan_figures(rows, root=None, write=False, shipped_d_sae=shipped, **meta)  # type: ignore[arg-type]
    assert [f.name for f in figures] == ["plan_error_time", "plan_error_memory"]
    assert all(f.value is not None and f.value < 1e-6 and f.met for f in figures)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    model = save_tiny_hf(root / "model", seed=1)
    save_sae(tiny_sae("topk", d_sae=48, seed=2), root / "sae")
    return root, model


def test_score_plan_prints_and_runs_nothing(saved, tmp_path, monkeypatch, capsys):
    root, model = saved
    stored = tmp_path / "costs.json"
    plan.save_costs(costs(model=str(model), n_layers=2, layer=0), stored)
    monkeypatch.setenv(plan.COSTS_ENV, str(stored))

    def refuse(*_args, **_kwargs):
        raise AssertionError("--plan must not score")

    monkeypatch.setattr("gradsae.cli.score.score_methods", refuse)
    args = ["score", "--model", str(model), "--sae", str(root / "sae"), "--layer", "0", "--no-chat"]
    assert main([*args, "--prompt", "hello there", "--plan", "--json", str(tmp_path / "out.json")]) == 0
    out = capsys.readouterr().out
    assert "# plan: gradsae score" in out and "predicted peak memory" in out
    assert not (tmp_path / "out.json").exists()
    tokens = int(out.split(" of ")[1].split(" tokens")[0])
    expected = plan.plan_score(costs(model=str(model), n_layers=2, layer=0), [tokens], layer=0, d_in=16, d_sae=48)
    assert f"{expected.seconds:.1f} s" in out


def test_plan_without_measured_costs_is_one_line(saved, tmp_path, monkeypatch, capsys):
    root, model = saved
    monkeypatch.setenv(plan.COSTS_ENV, str(tmp_path / "none.json"))
    code = main(["score", "--model", str(model), "--sae", str(root / "sae"), "--layer", "0", "--plan"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: no measured costs") and len(err.strip().splitlines()) == 1


def test_saved_costs_replace_the_same_key(tmp_path):
    path = tmp_path / "c.json"
    plan.save_costs(costs(load_s=1.0), path)
    plan.save_costs(costs(load_s=3.0), path)
    plan.save_costs(costs(threads=1), path)
    stored = json.loads(path.read_text())["costs"]
    assert len(stored) == 2 and plan.find_costs("m", "cpu", 2, path=path).load_s == 3.0
    assert plan.find_costs("m", "cpu:0", 1, path=path).threads == 1


def test_reproduce_plan_prints_and_runs_nothing(saved, tmp_path, monkeypatch, capsys):
    root, model = saved
    stored = tmp_path / "costs.json"
    plan.save_costs(costs(model=str(model), n_layers=2, layer=0), stored)
    monkeypatch.setenv(plan.COSTS_ENV, str(stored))
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"prompt": p, "answer": "x"}) + "\n" for p in ("abc", "hello there")))
    args = ["reproduce", "--model", str(model), "--sae", str(root / "sae"), "--layer", "0", "--task", str(task)]
    out_dir = tmp_path / "run"
    args += ["--ks", "1,3", "--max-new-tokens", "4", "--out", str(out_dir), "--plan"]
    assert main(args) == 0
    out = capsys.readouterr().out
    # masking: 2 sets x 2 K x 3 methods + K = 0; steering: 3 methods x 2 K x (swap, zero, inject; swap) + no edit
    assert "# plan: gradsae reproduce" in out and "38 conditions per example" in out
    assert "run to plan it: the keep filter and the ranking" in out and "of 2 kept" in out
    assert "upper bound" not in out
    assert not out_dir.exists() or not any(out_dir.iterdir())

    def refuse(*_args, **_kwargs):
        raise AssertionError("--no-pilot must not decode")

    monkeypatch.setattr("gradsae.experiments.run.keep_filter", refuse)
    assert main([*args, "--no-pilot"]) == 0
    out = capsys.readouterr().out
    assert "upper bound" in out and "nothing was run" in out
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_curves_plan_is_the_hand_computed_sum():
    """Per example: the estimators' passes, one ablated pass past block l per active latent, and the
    deletion / sufficiency sets of every order at every measured K."""
    c = costs()
    got = plan.curves_seconds(c, [100, 200], [40, 70], layer=5, orders=24, points=18, scores=2)
    back, n_layers = 10 - 5 - 1, 10

    def one(n: int, a: int) -> float:
        f = 0.01 * n + 1e-5 * n**2
        return 2 * f * (1 + back / n_layers) + a * f * back / n_layers + 2 * 24 * 18 * f * (back + 1) / n_layers

    assert got == pytest.approx(one(100, 40) + one(200, 70))


def test_reproduce_plan_with_curves_adds_them(saved, tmp_path, monkeypatch, capsys):
    """The plan of a run with ``--curves`` was the same as without (the curves, most of such a run, were left
    out): now it counts the active latents of the curve examples and adds the curves' cost."""
    root, model = saved
    stored = tmp_path / "costs.json"
    plan.save_costs(costs(model=str(model), n_layers=2, layer=0), stored)
    monkeypatch.setenv(plan.COSTS_ENV, str(stored))
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"prompt": p, "answer": "x"}) + "\n" for p in ("abc", "hello there")))
    args = ["reproduce", "--model", str(model), "--sae", str(root / "sae"), "--layer", "0", "--task", str(task)]
    args += ["--ks", "1,3", "--max-new-tokens", "4", "--out", str(tmp_path / "run"), "--plan", "--no-pilot"]
    assert main(args) == 0
    without = capsys.readouterr().out
    assert main([*args, "--curves", "--curves-n", "1"]) == 0
    with_curves = capsys.readouterr().out

    def seconds(out: str) -> float:
        return float(out.split("predicted wall time: ")[1].split(" s")[0])

    assert "curves on layer 0: 1 examples" in with_curves and "curves" not in without.split("# plan")[1]
    assert seconds(with_curves) > seconds(without)
