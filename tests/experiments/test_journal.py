"""The run journal: finished units survive an interruption, a rerun skips them and ends byte-identical.

Also: a damaged entry is recomputed, another configuration is refused (``--restart``
starts fresh), and a second run into the same folder is refused while the first holds it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import gradsae.experiments.perturb as perturb
from gradsae import _files
from gradsae.cli import main
from gradsae.errors import GradSAEError
from gradsae.experiments.config import ExperimentConfig, SpliceSpec
from gradsae.experiments.journal import FOLDER, Journal, count_units, unit_key
from gradsae.experiments.run import run_layer
from gradsae.tasks import Example, Task
from tests import helpers
from tests.tiny_files import tiny_run_files

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
    """Condition by condition (the reference path): a cut after 8 conditions reruns only the rest."""
    lm, sae = helpers.char_lm(seed=3), helpers.tiny_sae("topk", d_sae=48, seed=2)
    cfg = ExperimentConfig(
        splice=SpliceSpec(layer=0), ks=(1, "50%"), steer_positions=("last",), batch_size=3, bootstrap=50
    )
    task = _task(lm, sae, cfg)
    plain = run_layer(lm, sae, task, cfg, batched=False)
    whole = run_layer(lm, sae, task, cfg, Journal.open(tmp_path / "a", {"run": 1}), batched=False)
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
        run_layer(lm, sae, task, cfg, Journal.open(tmp_path / "b", {"run": 1}), batched=False)
    assert count_units(tmp_path / "b") == 8  # 8 conditions finished, the 9th was cut
    calls["n"] = -100
    resumed = run_layer(lm, sae, task, cfg, Journal.open(tmp_path / "b", {"run": 1}), batched=False)
    total = len(plain.perturbation) + len(plain.steering)
    assert calls["n"] == -100 + total - 8  # only the unfinished conditions ran again
    assert json.dumps(dataclasses.asdict(resumed)) == json.dumps(dataclasses.asdict(plain))
    calls["n"] = -100
    assert run_layer(lm, sae, task, cfg, Journal.open(tmp_path / "b", {"run": 1}), batched=False) == resumed
    assert calls["n"] == -100  # a finished layer is not recomputed at all


def test_interrupted_batched_layer_resumes_to_the_same_result(tmp_path, monkeypatch):
    """Group by group (the batched path): a cut in the third group reruns only the unfinished groups."""
    lm, sae = helpers.char_lm(seed=3), helpers.tiny_sae("topk", d_sae=48, seed=2)
    cfg = ExperimentConfig(
        splice=SpliceSpec(layer=0), ks=(1, "50%"), steer_positions=("last",), batch_size=3, bootstrap=50
    )
    task = _task(lm, sae, cfg)
    plain = run_layer(lm, sae, task, cfg)
    assert run_layer(lm, sae, task, cfg, batched=False) == plain, "batched and one at a time agree"
    calls = {"groups": 0, "conditions": 0}
    real = perturb.decode_conditions

    def counting(*args, **kwargs):
        calls["groups"] += 1
        if calls["groups"] == 3:
            raise _StopError
        calls["conditions"] += len(args[5])
        return real(*args, **kwargs)

    monkeypatch.setattr(perturb, "decode_conditions", counting)
    with pytest.raises(_StopError):
        run_layer(lm, sae, task, cfg, Journal.open(tmp_path / "b", {"run": 1}))
    finished = calls["conditions"]
    assert count_units(tmp_path / "b") == finished == 9  # none + gradsae's 4, then activation's 4
    calls.update(groups=-100, conditions=0)
    resumed = run_layer(lm, sae, task, cfg, Journal.open(tmp_path / "b", {"run": 1}))
    total = len(plain.perturbation) + len(plain.steering)
    assert calls["conditions"] == total - finished  # only the unfinished groups ran again
    assert json.dumps(dataclasses.asdict(resumed)) == json.dumps(dataclasses.asdict(plain))
    calls.update(groups=-100, conditions=0)
    assert run_layer(lm, sae, task, cfg, Journal.open(tmp_path / "b", {"run": 1})) == resumed
    assert calls["conditions"] == 0  # a finished layer is not recomputed at all


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return tiny_run_files(tmp_path_factory.mktemp("tiny"))


def _reproduce(files: Path, out: Path, *extra: str) -> list[str]:
    return [
        "reproduce",
        *("--model", str(files / "model"), "--sae", str(files / "sae"), "--task", str(files / "task.jsonl")),
        *("--out", str(out), "--n", "8", "--ks", "1,50%", "--steer-positions", "last", "--batch-size", "4"),
        *("--max-new-tokens", "3", *extra),
    ]


def test_reproduce_ctrl_c_says_what_is_saved_and_resumes(tiny_run, tmp_path, monkeypatch, capsys):
    assert main(_reproduce(tiny_run, tmp_path / "whole")) == 0
    real, calls = perturb.decode_conditions, {"n": 0}

    def interrupt(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # in the second group of conditions: the first (no edit + gradsae's 4) is saved
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(perturb, "decode_conditions", interrupt)
    capsys.readouterr()
    assert main(_reproduce(tiny_run, tmp_path / "cut")) == 130
    err = capsys.readouterr().err
    assert (
        f"5 finished unit(s) (layers, masking and steering conditions) are saved in {tmp_path / 'cut' / FOLDER};" in err
    )
    assert "run the same command again to continue" in err and not (tmp_path / "cut" / "results.json").exists()
    monkeypatch.setattr(perturb, "decode_conditions", real)
    assert main(_reproduce(tiny_run, tmp_path / "cut")) == 0
    first = (tmp_path / "whole" / "results.json").read_bytes()
    assert (tmp_path / "cut" / "results.json").read_bytes() == first
    assert json.loads(first)["layers"][0]["steering"], "the tiny run must exercise steering"

    capsys.readouterr()
    assert main(_reproduce(tiny_run, tmp_path / "cut", "--seed", "1")) == 2
    assert "(seed: 0 there, 1 now)" in capsys.readouterr().err
    assert main(_reproduce(tiny_run, tmp_path / "cut", "--seed", "1", "--restart")) == 0
    assert json.loads((tmp_path / "cut" / "results.json").read_text())["config"]["seed"] == 1
