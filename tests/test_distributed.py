"""Data parallel runs: ``torchrun --nproc_per_node 2 -m gradsae ...`` writes what one process writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gradsae import distributed
from gradsae.cli import main
from gradsae.generate import generate
from gradsae.models import load_model
from gradsae.sae_formats import save_sae
from tests.helpers import save_tiny_hf, tiny_sae

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["hello there", "abc", "the quick fox", "zebra", "mnop qr", "why not", "ok go", "lorem ipsum", "xyz"]


def test_one_process_helpers_are_the_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main()
    assert distributed.shard([1, 2, 3]) == [1, 2, 3]
    assert distributed.map_items(lambda x: x * 2, [1, 2, 3]) == [2, 4, 6]
    assert distributed.device_for("cuda") == "cuda"


def test_shard_and_gather_order(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    items = list(range(8))
    shards = []
    for r in range(3):
        monkeypatch.setenv("RANK", str(r))
        shards.append(distributed.shard(items))
    assert shards == [[0, 3, 6], [1, 4, 7], [2, 5]]
    interleaved = [shards[i % 3][i // 3] for i in range(8)]  # what gather rebuilds from all_gather_object
    assert interleaved == items
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert distributed.device_for("cuda") == "cuda:2"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved tiny model and tokenizer, a random SAE, a task file half of whose answers the model gives."""
    root = tmp_path_factory.mktemp("dist")
    model = save_tiny_hf(root / "model", seed=3)
    save_sae(tiny_sae("topk", d_sae=48, seed=2), root / "sae")
    lm = load_model(model)
    said = [g.text for g in generate(lm, PROMPTS, max_new_tokens=4)]
    from gradsae.tasks import parse_result

    rows = [
        {"prompt": p, "answer": parse_result(t) if i % 3 else "never", "group": str(i // 3)}
        for i, (p, t) in enumerate(zip(PROMPTS, said, strict=True))
    ]
    (root / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "prompts.txt").write_text("\n".join(PROMPTS[:5]) + "\n")
    return root


def _torchrun(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "gradsae"]
    done = subprocess.run([*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def test_torchrun_reproduce_and_score_equal_one_process(files, tmp_path):
    common = ["--model", str(files / "model"), "--sae", str(files / "sae"), "--layer", "0"]
    reproduce = ["reproduce", *common, "--task", str(files / "task.jsonl"), "--examples", "9", "--ks", "1,3"]
    reproduce += ["--batch-size", "2", "--max-new-tokens", "4", "--steer-positions", "last,all"]
    score = ["score", *common, "--prompts", str(files / "prompts.txt"), "--no-chat", "--top", "5"]
    assert main([*reproduce, "--out", str(tmp_path / "one")]) == 0
    assert main([*score, "--json", str(tmp_path / "one.json")]) == 0
    log = _torchrun([*reproduce, "--out", str(tmp_path / "two")], tmp_path)
    assert "rank 0 of 2 (gloo)" in log and "rank 1 of 2 (gloo)" in log
    _torchrun([*score, "--json", str(tmp_path / "two.json")], tmp_path)
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    assert one["layers"][0]["n_kept"] >= 4 and one["layers"][0]["n_donor_pairs"] >= 2
    assert (tmp_path / "two" / "results.json").read_text() == (tmp_path / "one" / "results.json").read_text()
    # the rows scored on rank 1 reach rank 0's examples.json; rank 0 alone wrote the journal
    assert (tmp_path / "two" / "examples.json").read_text() == (tmp_path / "one" / "examples.json").read_text()
    assert sorted(p.name for p in (tmp_path / "two" / "journal").iterdir()) == sorted(
        p.name for p in (tmp_path / "one" / "journal").iterdir()
    )
    assert (tmp_path / "two.json").read_text() == (tmp_path / "one.json").read_text()
    assert len(json.loads((tmp_path / "one.json").read_text())["prompts"]) == 5


def test_torchrun_curves_are_shared_among_the_ranks(files, tmp_path):
    """``reproduce --curves`` under torchrun: each kept example's curves are measured once, by one rank, and
    the results equal one process's. Before, every rank measured every example (no speed-up at all)."""
    common = ["--model", str(files / "model"), "--sae", str(files / "sae"), "--layer", "0"]
    args = ["reproduce", *common, "--task", str(files / "task.jsonl"), "--examples", "9", "--ks", "1,3"]
    args += ["--batch-size", "2", "--max-new-tokens", "4", "--curves", "--curves-n", "3"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    log = _torchrun([*args, "--out", str(tmp_path / "two")], tmp_path)
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    n = len(one["layers"][0]["curves"]["examples"])
    assert n == 3
    assert log.count("curves of kept example") == n  # each once
    assert "(rank 0)" in log and "(rank 1)" in log  # by both ranks
    assert (tmp_path / "two" / "results.json").read_text() == (tmp_path / "one" / "results.json").read_text()
    curve_units = sorted(p.name for p in (tmp_path / "two" / "journal").iterdir() if "curve" in p.name)
    assert curve_units == ["0-curve-0.json", "0-curve-1.json", "0-curve-2.json"]


def test_torchrun_steer_equals_one_process(files, tmp_path):
    """Each rank computes its share of the (layer, seed, concept) units into the shared journal; rank 0 then
    writes the steering.json one process writes, byte for byte."""
    concepts = [
        {"name": "abc", "words": ["ab", "cd"], "texts": ["ab cd ab", "cd ab"], "negatives": ["xy zz"]},
        {"name": "fox", "words": ["fox", "quick"], "texts": ["the quick fox", "a fox"]},
        {"name": "ok", "words": ["ok", "go"], "texts": ["ok go ok"], "negatives": ["why not"]},
    ]
    (files / "concepts.json").write_text(json.dumps(concepts))
    steer = ["steer", "--model", str(files / "model"), "--sae", str(files / "sae"), "--layer", "0"]
    steer += ["--concept-file", str(files / "concepts.json"), "--k", "3", "--alphas", "0.5,2"]
    steer += ["--methods", "gradsae,activation,random", "--random-draws", "1", "--n-seed", "2", "--n-heldout", "2"]
    steer += ["--n-eval", "2", "--max-new-tokens", "4", "--seeds", "0,1", "--resamples", "20", "--pool", "8"]
    assert main([*steer, "--out", str(tmp_path / "one")]) == 0
    log = _torchrun([*steer, "--out", str(tmp_path / "two")], tmp_path)
    assert "rank 1 of 2 (gloo)" in log
    # every selector run (2 cells x 3 concepts x 3 runs) was generated once, by one rank: none twice, none by both
    assert log.count("held-aside sweep") == 18
    one, two = tmp_path / "one", tmp_path / "two"
    one_json, two_json = (json.loads((d / "steering.json").read_text()) for d in (one, two))
    assert two_json.pop("command").endswith(f"--out {two}")  # the one command that differs (sys.argv)
    one_json.pop("command")
    assert json.dumps(two_json, sort_keys=True) == json.dumps(one_json, sort_keys=True)
    assert sorted(p.name for p in (two / "journal").iterdir()) == sorted(p.name for p in (one / "journal").iterdir())
    cells = json.loads((one / "steering.json").read_text())["cells"]
    assert len(cells) == 2 and all(len(cell["concepts"]) == 3 for cell in cells)


def test_torchrun_plan_runs_its_pilot_on_every_rank(files, tmp_path):
    """``reproduce --plan`` runs the keep filter and the ranking, which shard their batches over the ranks:
    under torchrun only rank 0 ran the plan, so its pilot waited for a rank that had returned."""
    from gradsae import plan
    from tests.test_plan import costs

    stored = tmp_path / "costs.json"
    plan.save_costs(costs(model=str(files / "model"), n_layers=2, layer=0, threads=1), stored)
    common = ["--model", str(files / "model"), "--sae", str(files / "sae"), "--layer", "0"]
    args = ["reproduce", *common, "--task", str(files / "task.jsonl"), "--examples", "9", "--ks", "1,3"]
    args += ["--batch-size", "2", "--max-new-tokens", "4", "--out", str(tmp_path / "run"), "--plan"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    env[plan.COSTS_ENV] = str(stored)
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "gradsae"]
    done = subprocess.run(
        [*cmd, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("# plan: gradsae reproduce") == 1 and "the keep filter and the ranking" in done.stdout
    kept = done.stdout.split("layer 0: ")[1].split(" kept")[0]
    one = subprocess.run(
        [sys.executable, "-m", "gradsae", *args], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
    )
    assert one.returncode == 0 and f"layer 0: {kept} kept" in one.stdout
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
