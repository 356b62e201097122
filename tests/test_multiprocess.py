"""A real 2-process CPU pretraining run (torchrun, gloo) against a 1-process run of the same global batch."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]

# The CLI, plus: at each checkpoint every rank also dumps its own weights, to compare the ranks.
HARNESS = """
import json, sys, torch
import accelvit.checkpoint as checkpoint

real_save = checkpoint.save_checkpoint

def save(accelerator, run_dir, state, *args, **kwargs):
    path = real_save(accelerator, run_dir, state, *args, **kwargs)
    model = accelerator.unwrap_model(accelerator._models[0])
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    torch.save(params, run_dir / f"rank{accelerator.process_index}_step{state.step}.pt")
    decisions = run_dir / f"rank{accelerator.process_index}_decisions_step{state.step}.json"
    decisions.write_text(json.dumps(state.decisions))
    return path

checkpoint.save_checkpoint = save  # what checkpoint.save calls
from accelvit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def launch(tmp_path: Path, processes: int, *args: str) -> None:
    harness = tmp_path / "harness.py"
    harness.write_text(HARNESS)
    if processes == 1:
        command = [sys.executable, str(harness)]
    else:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_port", "29533", str(harness),
        ]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*command, *args], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


SCHEDULE_KEYS = ("step", "progress", "lr", "keep", "patch", "tokens", "budget_spent")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny recipe for 6 steps: 2 processes x 4 images, and 1 process x 8 images."""
    from tests.conftest import TINY, write_recipe

    tmp = tmp_path_factory.mktemp("mp")
    recipe = write_recipe(tmp / "tiny.yaml", TINY)
    two, one = tmp / "two", tmp / "one"
    launch(tmp, 2, "pretrain", str(recipe), "-o", str(two), "--set", "train.batch_size=4")
    launch(tmp, 1, "pretrain", str(recipe), "-o", str(one), "--set", "train.batch_size=8")
    return tmp, recipe, two, one


def test_both_ranks_hold_identical_weights(runs):
    # parameters; the heads' batch-norm statistics are per process on CPU (see build.build_model)
    _, _, two, _ = runs
    for step in (3, 6):
        rank0 = torch.load(two / f"rank0_step{step}.pt")
        rank1 = torch.load(two / f"rank1_step{step}.pt")
        assert rank0.keys() == rank1.keys()
        assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    saved = load_file(str(two / "checkpoints/step_6/model.safetensors"))
    assert all(torch.equal(saved[k], rank0[k]) for k in rank0)


def test_global_batch_and_schedules_match_the_one_process_run(runs):
    _, _, two, one = runs
    state_two = json.loads((two / "checkpoints/step_6/trainer_state.json").read_text())
    state_one = json.loads((one / "checkpoints/step_6/trainer_state.json").read_text())
    assert state_two["images_seen"] == 6 * 2 * 4 == state_one["images_seen"]
    # learning rate, compression setting and budget advance once per step, not once per process
    a, b = records(two), records(one)
    assert [[r[k] for k in SCHEDULE_KEYS] for r in a] == [[r[k] for k in SCHEDULE_KEYS] for r in b]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in a)


def test_checkpoints_are_written_once_and_resume_with_two_or_one_process(runs):
    tmp, _, two, _ = runs
    checkpoint = two / "checkpoints/step_6"
    files = sorted(p.name for p in checkpoint.iterdir())
    assert files.count("model.safetensors") == 1
    # one RNG state per process, everything else once
    assert [f for f in files if f.startswith("random_states")] == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    assert [r["step"] for r in records(two)] == [1, 2, 3, 4, 5, 6]  # only rank 0 logs

    # resume with 2 processes: bit for bit the uninterrupted run
    resumed = tmp / "resumed2"
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "checkpoints/step_6")
    launch(tmp, 2, "resume", str(resumed))
    assert [(r["step"], r["loss"]) for r in records(resumed)] == [
        (r["step"], r["loss"]) for r in records(two)
    ]
    a = load_file(str(resumed / "checkpoints/step_6/model.safetensors"))
    assert all(torch.equal(a[k], v) for k, v in load_file(str(checkpoint / "model.safetensors")).items())

    # resume with 1 process (the recipe says 4 images per process, so its global batch is 4)
    single = tmp / "resumed1"
    shutil.copytree(two, single)
    shutil.rmtree(single / "checkpoints/step_6")
    launch(tmp, 1, "resume", str(single))
    state = json.loads((single / "checkpoints/step_6/trainer_state.json").read_text())
    assert state["step"] == 6 and state["images_seen"] == 3 * 8 + 3 * 4


HANGING_PEER = """
import os, sys, time
import accelvit.build as build

real_load = build.load_dataset

def load(*args, **kwargs):
    if os.environ.get("RANK") == "1":
        time.sleep(120)  # a peer that hangs (a stuck file system, a deadlock)
    return real_load(*args, **kwargs)

build.load_dataset = load
from accelvit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_hung_peer_stops_the_run_after_the_process_timeout(tmp_path):
    from tests.conftest import TINY, write_recipe

    recipe = write_recipe(tmp_path / "tiny.yaml", TINY)
    harness = tmp_path / "harness.py"
    harness.write_text(HANGING_PEER)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29534",
        str(harness), "pretrain", str(recipe), "-o", str(tmp_path / "run"), "--set", "train.process_timeout=5",
    ]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0
    assert time.monotonic() - start < 90  # not torch's 30 minutes, nor the peer's 120 s
    # one line naming the stalled process and where it was, instead of gloo's traceback
    assert re.search(
        r"accelvit: stopped: a peer process did not answer within train.process_timeout=5 s: "
        r"process 1 was at loading the data \(last heard from \d+ s ago\); the others were at step 1\n",
        result.stderr,
    ), result.stderr[-3000:]


def test_two_nodes_train_as_two_processes_of_one_node_and_resume_on_one(runs):
    # two "machines" of one process each (torchrun --nnodes 2, static rendezvous on this host), the
    # run directory on a file system both see, as multi-node runs need
    tmp, recipe, two, _ = runs
    nodes = tmp / "nodes"
    harness = tmp / "harness.py"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", "29535", str(harness),
                "pretrain", str(recipe), "-o", str(nodes), "--set", "train.batch_size=4",
            ],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for rank in (0, 1)
    ]  # fmt: skip
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    # the same parameters on both nodes, and the same run as 2 processes on one node, bit for bit
    for step in (3, 6):
        rank0, rank1 = (torch.load(nodes / f"rank{r}_step{step}.pt") for r in (0, 1))
        assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    a = load_file(str(nodes / "checkpoints/step_6/model.safetensors"))
    b = load_file(str(two / "checkpoints/step_6/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [[r[k] for k in (*SCHEDULE_KEYS, "loss")] for r in records(nodes)] == [
        [r[k] for k in (*SCHEDULE_KEYS, "loss")] for r in records(two)
    ]
    # a checkpoint of the two nodes resumes on one
    shutil.rmtree(nodes / "checkpoints/step_6")
    launch(tmp, 1, "resume", str(nodes))
    state = json.loads((nodes / "checkpoints/step_6/trainer_state.json").read_text())
    assert state["step"] == 6 and state["images_seen"] == 3 * 8 + 3 * 4


def test_an_adaptive_lookahead_run_decides_alike_on_both_ranks(tmp_path):
    # each rank trains its share of the lookahead steps' global batches and reads its share of the
    # held-out loss; the averaged losses, so the decisions and the schedule after them, are the same
    from tests.conftest import TINY, write_recipe

    recipe = write_recipe(tmp_path / "tiny.yaml", TINY)
    run = tmp_path / "run"
    options = [
        "train.batch_size=4", "train.steps=null", f"train.budget={16 * 6 * 8}", "schedule.mode=adaptive",
        "schedule.stages=[0.0, 0.5]", "schedule.candidates=0.5:4,0.25:8", "schedule.adaptive_batches=2",
        "schedule.adaptive_metric=lookahead", "schedule.lookahead_steps=1",
    ]  # fmt: skip
    launch(tmp_path, 2, "pretrain", str(recipe), "-o", str(run), *[a for o in options for a in ("--set", o)])
    step = records(run)[-1]["step"]
    decisions = [json.loads((run / f"rank{r}_decisions_step{step}.json").read_text()) for r in (0, 1)]
    assert decisions[0] == decisions[1] and [d["stage"] for d in decisions[0]] == [0.0, 0.5]
    rank0, rank1 = (torch.load(run / f"rank{r}_step{step}.pt") for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
