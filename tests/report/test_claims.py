"""The tables and summary sentences: exact tests, exact intervals, the K used, labels, counts after Holm."""

from __future__ import annotations

from gradsae.experiments.results import Condition, LayerResult, RunMeta
from gradsae.experiments.stats import stat
from gradsae.report.tables import summary_lines, table_markdown

N = 22


def _cond(method, which, k, ones, *, edit="zero", mean_k=None, k_range=None, n=N, first=0):
    """A condition whose examples ``first .. first + ones - 1`` are right (1) and the rest wrong (0)."""
    values = tuple(1.0 if first <= i < first + ones else 0.0 for i in range(n))
    kk = float(k) if mean_k is None else mean_k
    low, high = k_range if k_range else (None, None)
    s = stat(list(values), seed=0, resamples=200)
    return Condition(
        method=method, set=which, k=k, exact=s, f1=s, mean_k=kk, edit=edit, per_example=values, k_min=low, k_max=high
    )


def _meta(ks=("10", "50%", "20")):
    return RunMeta(
        task="tiny",
        metric="accuracy",
        model="tiny",
        n=30,
        seed=0,
        mode="error",
        methods=("gradsae", "activation", "random"),
        ks=ks,
        steer_positions=("last",),
        sae_labels={"6": "sae"},
        batch_size=4,
        max_new_tokens=4,
        objective="p",
        aggregation="paper",
        versions={},
    )


def _layer(conditions, layer=6):
    s = stat([1.0] * N, seed=0, resamples=200)
    none = Condition(method="none", set="-", k="0", exact=s, f1=s, edit="none", per_example=(1.0,) * N)
    return LayerResult(
        layer=layer,
        n_examples=30,
        n_kept=N,
        baseline=s,
        clean_baseline=s,
        perturbation=(none, *conditions),
        steering=(),
        overlap={},
        n_donor_pairs=0,
        diagnostics={},
    )


def _cells():
    """K=10: GradSAE 0 right vs activation 10 (10 discordant, one way); K=50% (16): 0 vs 4; K=20: 8 vs 0."""
    half = (16, 16)
    return [
        _cond("gradsae", "top", "10", 0),
        _cond("activation", "top", "10", 10),
        _cond("gradsae", "top", "50%", 0, mean_k=16.0, k_range=half),
        _cond("activation", "top", "50%", 4, mean_k=16.0, k_range=half),
        _cond("gradsae", "top", "20", 8),
        _cond("activation", "top", "20", 0),
        _cond("random", "top", "10", 22),
        _cond("random", "bottom", "10", 21),
        _cond("random", "top", "50%", 22, mean_k=16.0, k_range=half),
        _cond("random", "top", "20", 20),
    ]


def test_table_has_exact_p_exact_intervals_k_used_and_labels():
    text = table_markdown([_layer(_cells())], _meta())
    head = next(line for line in text.splitlines() if line.startswith("| ranking / edited set"))
    assert head == "| ranking / edited set | K=10 | K=50% (16) | K=20 |"  # increasing actual K
    assert "K = 50%: 16 for every example" in text
    rows = {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| ")}
    assert "random TopK, second draw" in rows and "random BottomK" not in rows
    assert rows["GradSAE TopK"].split(" | ")[1] == "0.0 [0.0, 15.4]"  # Clopper-Pearson, 0 of 22
    paired = rows["GradSAE - activation TopK, paired"].removesuffix(" |").split(" | ")
    assert paired[1].endswith("p=0.002")  # 10 discordant, all one way: 2 / 2^10 = 0.00195
    assert paired[2].endswith("p=0.12")  # 4 vs 0: 0.125
    assert paired[3].startswith("+36.4") and paired[3].endswith("p=0.008")  # 8 vs 0: 2 / 256


def test_summary_counts_after_holm_and_states_the_reversal():
    lines = summary_lines([_layer(_cells())], _meta())
    exp1 = next(line for line in lines if "Experiment 1" in line)
    # p = 0.00195, 0.125, 0.0078 -> Holm: 0.0059, 0.125, 0.0156: two resolved, one of them the reversal
    assert "in 2 of 3 cells by the point estimate and in 1 of 3 after Holm" in exp1
    assert "1 independent example set" in exp1
    assert "Reversed (GradSAE's TopK hurts less) in 1: layer 6, K = 20: +36.4" in exp1
    assert "(resolved after Holm)" in exp1
    assert any("Random TopK keeps 91-100%" in line for line in lines)


def test_two_layers_of_one_task_are_one_example_set():
    layers = [_layer(_cells(), layer=6), _layer(_cells(), layer=15)]
    exp1 = next(line for line in summary_lines(layers, _meta()) if "Experiment 1" in line)
    assert "in 4 of 6 cells by the point estimate" in exp1 and "stand on 1 independent example set" in exp1


def test_a_tied_cell_is_counted_and_named():
    """A difference of exactly 0 is neither "better" nor "reversed": the sentence names it, so the counts add up."""
    cells = [c for c in _cells() if c.k != "50%"] + [
        _cond("gradsae", "top", "50%", 0, mean_k=16.0, k_range=(16, 16)),
        _cond("activation", "top", "50%", 0, mean_k=16.0, k_range=(16, 16)),  # both take every answer to 0
    ]
    exp1 = next(line for line in summary_lines([_layer(cells)], _meta()) if "Experiment 1" in line)
    assert "in 1 of 3 cells by the point estimate" in exp1
    assert "Reversed (GradSAE's TopK hurts less) in 1: layer 6, K = 20" in exp1
    assert "Tied (difference 0) in 1: layer 6, K = 50% (16)." in exp1


def test_cells_too_small_to_resolve_are_counted():
    """With n discordant pairs the smallest exact McNemar p is 2 / 2^n: K = 50% has 4 (p >= 0.125), the others
    10 and 8 (p can reach 0.002 and 0.008)."""
    exp1 = next(line for line in summary_lines([_layer(_cells())], _meta()) if "Experiment 1" in line)
    assert exp1.endswith(
        "1 of the 3 tested cells has at most 4 discordant pairs, too few for an exact McNemar p <= 0.05 "
        "whatever the outcome."
    )
