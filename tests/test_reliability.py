"""Faults caused for real: NaN through the data, a killed process, a partial checkpoint, a failing
disk write, corrupt image files, an edited recipe. Nothing before the last checkpoint may be lost."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from accelvit.checkpoint import create_run_dir, file_digest, latest_checkpoint, list_checkpoints
from accelvit.cli import main
from accelvit.config import ConfigError, load_config
from accelvit.data import StepBatchSampler
from accelvit.objectives import OBJECTIVES, Objective
from accelvit.train import NonFiniteError, pretrain

REPO = Path(__file__).resolve().parents[1]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


# ---------------------------------------------------------------------------------------------
# NaN injected through the data: the views of one image of the synthetic set are NaN


# The image whose views are NaN: one not in the first batch (16 images, batch 8, seed 0).
POISONED = min(set(range(16)) - {i for i, _ in next(iter(StepBatchSampler(16, 8, 0, 0, 1)))})


@pytest.fixture
def poisoned_data(monkeypatch):
    simclr = OBJECTIVES["simclr"]
    marker = None

    def transform(cfg, model, data):
        views = simclr.transform(cfg, model, data)

        def poisoned(image):
            out = views(image)
            if np.array_equal(np.asarray(image), marker):
                out = [torch.full_like(v, float("nan")) for v in out]
            return out

        return poisoned

    from accelvit.config import DataConfig
    from accelvit.data import load_dataset

    marker = np.asarray(load_dataset(DataConfig(dataset="synthetic", limit=16))[POISONED][0])
    monkeypatch.setitem(
        OBJECTIVES, "simclr", Objective(simclr.build, transform, simclr.branches, simclr.view_specs)
    )


def poisoned_steps(steps: int) -> list[int]:
    """Steps (1-based) whose batch holds the poisoned image: 16 images, batch 8, seed 0."""
    sampler = StepBatchSampler(16, 8, 0, 0, steps)
    return [s + 1 for s, keys in enumerate(sampler) if POISONED in [i for i, _ in keys]]


def test_nonfinite_loss_stops_and_keeps_the_last_good_state(tmp_path, tiny_recipe, poisoned_data):
    cfg = load_config(tiny_recipe, ["data.limit=16", "train.steps=8", "train.checkpoint_every=1"])
    first_bad = poisoned_steps(8)[0]
    assert first_bad > 1
    run_dir = tmp_path / "run"
    create_run_dir(run_dir, cfg)
    with pytest.raises(NonFiniteError) as info:
        pretrain(cfg, run_dir)
    message = str(info.value)
    assert message.startswith(f"step {first_bad}: non-finite loss nan")
    assert f"last good state: {run_dir / 'checkpoints' / f'step_{first_bad - 1}'}" in message
    assert "\n" not in message
    assert latest_checkpoint(run_dir).name == f"step_{first_bad - 1}"
    weights = load_file(str(run_dir / f"checkpoints/step_{first_bad - 1}/model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert [s for s, _ in losses(run_dir)] == list(range(1, first_bad))


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, tiny_recipe, poisoned_data):
    cfg = load_config(
        tiny_recipe, ["data.limit=16", "train.steps=8", "train.on_nonfinite=skip", "train.max_skipped=3"]
    )
    bad = poisoned_steps(8)
    assert 0 < len(bad) < 8
    run_dir = tmp_path / "run"
    create_run_dir(run_dir, cfg)
    assert pretrain(cfg, run_dir).step == 8
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        assert r.get("skipped", 0) == sum(1 for s in bad if s <= r["step"])
        assert (r["loss"] is None) == (r["step"] in bad)  # log_every 1: a skipped step logs no loss
        assert r["loss"] is None or np.isfinite(r["loss"])
    weights = load_file(str(run_dir / "checkpoints/step_8/model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_too_many_skipped_steps_in_a_row_stop(tmp_path, tiny_recipe, poisoned_data):
    # 8 images, batch 8: every batch holds the poisoned image
    cfg = load_config(
        tiny_recipe, ["data.limit=8", "train.steps=8", "train.on_nonfinite=skip", "train.max_skipped=2"]
    )
    run_dir = tmp_path / "run"
    create_run_dir(run_dir, cfg)
    with pytest.raises(NonFiniteError, match=r"^step 2: .*2 steps in a row \(train.max_skipped\)"):
        pretrain(cfg, run_dir)
    # the checkpoint holds the state before step 2: one step done, and skipped
    state = json.loads((run_dir / "checkpoints/step_1/trainer_state.json").read_text())
    assert (state["step"], state["skipped"], state["skipped_in_row"]) == (1, 1, 1)


# ---------------------------------------------------------------------------------------------
# A killed process and a partially written checkpoint


def _start(run_dir: Path, recipe: Path, *overrides: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "accelvit.cli", "pretrain", str(recipe), "-o", str(run_dir)]
    for item in overrides:
        args += ["--set", item]
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_then_resume_loses_nothing_before_the_last_checkpoint(tmp_path, tiny_recipe):
    overrides = ["train.steps=40", "train.checkpoint_every=1", "train.keep_checkpoints=2"]
    reference = tmp_path / "reference"
    cfg = load_config(tiny_recipe, overrides)
    create_run_dir(reference, cfg)
    pretrain(cfg, reference)

    run_dir = tmp_path / "run"
    proc = _start(run_dir, tiny_recipe, *overrides)
    deadline = time.time() + 120
    while len(list((run_dir / "checkpoints").glob("step_*"))) < 2 or len(losses(run_dir)) < 5:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.3)  # it saves every step: the kill may well land mid-save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = len(losses(run_dir))
    assert killed_at < 40

    # what a crash in the middle of a save leaves: a temporary folder with a truncated file
    newest = latest_checkpoint(run_dir)
    partial = run_dir / "checkpoints" / f".tmp-step_{killed_at + 1}"
    shutil.copytree(newest, partial)
    (partial / "model.safetensors").write_bytes((partial / "model.safetensors").read_bytes()[:100])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pretrain(cfg, run_dir, resume=True)
    assert any("removing incomplete checkpoint" in str(w.message) for w in caught)
    assert not partial.exists()
    assert losses(run_dir) == losses(reference)  # bit for bit, as if it had never been killed
    a = load_file(str(run_dir / "checkpoints/step_40/model.safetensors"))
    b = load_file(str(reference / "checkpoints/step_40/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_damaged_checkpoint_is_passed_over_for_the_previous_one(tmp_path, tiny_config):
    run_dir = tmp_path / "run"
    create_run_dir(run_dir, tiny_config)
    pretrain(tiny_config, run_dir)
    model = run_dir / "checkpoints/step_6/model.safetensors"
    model.write_bytes(model.read_bytes()[:-10])  # the disk lost its tail
    with pytest.warns(UserWarning, match="step_6' is damaged: model.safetensors has"):
        assert latest_checkpoint(run_dir).name == "step_3"


# ---------------------------------------------------------------------------------------------
# A write error while saving (the kernel refuses to grow a file past RLIMIT_FSIZE)

DISK_FULL_SCRIPT = """
import resource, signal, sys
import accelvit.checkpoint as checkpoint

real_save, calls = checkpoint.save_checkpoint, []

def save(accelerator, run_dir, state, *args, **kwargs):
    calls.append(state.step)
    if len(calls) == 2:  # from the second checkpoint on, no file may grow past 20 kB
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))
    return real_save(accelerator, run_dir, state, *args, **kwargs)

checkpoint.save_checkpoint = save  # what checkpoint.save calls
from accelvit.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("policy", ["stop", "warn"])
def test_a_failing_checkpoint_write_keeps_the_earlier_checkpoints(tmp_path, tiny_recipe, policy):
    run_dir = tmp_path / "run"
    args = ["pretrain", str(tiny_recipe), "-o", str(run_dir), "--set", f"train.on_save_error={policy}"]
    proc = subprocess.run(
        [sys.executable, "-c", DISK_FULL_SCRIPT, *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_3"]
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    expected = f"could not write checkpoint {run_dir / 'checkpoints' / 'step_6'}"
    if policy == "stop":
        assert proc.returncode == 1, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"accelvit: stopped: {expected}")
        assert last.endswith(f"newest intact checkpoint: {run_dir / 'checkpoints' / 'step_3'}")
    else:
        assert proc.returncode == 0, proc.stderr
        assert expected in proc.stderr and "training goes on (train.on_save_error: warn)" in proc.stderr
    # the surviving checkpoint resumes
    cfg = load_config(run_dir / "recipe.yaml")
    assert pretrain(cfg, run_dir, resume=True).step == 6


# ---------------------------------------------------------------------------------------------
# Corrupt image files


def _folder_with_bad_files(root: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(6):
                pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.jpg")
    truncated = root / "train/a/0.jpg"
    truncated.write_bytes(truncated.read_bytes()[:200])  # a JPEG cut short
    garbage = root / "train/b/3.jpg"
    garbage.write_bytes(b"not an image at all")
    return [truncated, garbage]


def test_unreadable_images_are_skipped_and_reported(tmp_path, tiny_recipe, capsys):
    bad = _folder_with_bad_files(tmp_path / "images")
    cfg = load_config(
        tiny_recipe,
        ["data.dataset=imagefolder", f"data.root={tmp_path / 'images'}", "data.limit=null", "train.steps=6"],
    )
    run_dir = tmp_path / "run"
    create_run_dir(run_dir, cfg)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        pretrain(cfg, run_dir)
    out = capsys.readouterr().out
    # 6 steps x 8 = 48 reads of 12 images: each image 4 times
    assert "skipped 8 reads of unreadable images, e.g. " in out
    assert all(str(p) in out for p in bad)
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["bad_files"] == 8


def test_unreadable_image_is_an_error_when_asked(tmp_path, tiny_recipe):
    _folder_with_bad_files(tmp_path / "images")
    cfg = load_config(
        tiny_recipe,
        ["data.dataset=imagefolder", f"data.root={tmp_path / 'images'}", "data.on_bad_file=error"],
    )
    run_dir = tmp_path / "run"
    create_run_dir(run_dir, cfg)
    with pytest.raises(
        ConfigError, match=r"^unreadable image .*images/train/./\d.jpg: .*data.on_bad_file: error"
    ):
        pretrain(cfg, run_dir)


# ---------------------------------------------------------------------------------------------
# Resume refuses what it cannot continue


def test_resume_refuses_an_edited_model_or_objective(tmp_path, tiny_config, capsys):
    run_dir = tmp_path / "run"
    create_run_dir(run_dir, tiny_config)
    pretrain(tiny_config, run_dir)
    recipe = run_dir / "recipe.yaml"
    original = recipe.read_text()
    recipe.write_text(
        original.replace("depth: 2", "depth: 3").replace("temperature: 0.5", "temperature: 0.1")
    )
    before = sorted(p.name for p in list_checkpoints(run_dir))
    capsys.readouterr()
    assert main(["resume", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("accelvit: error: resume refused: the recipe changes model.depth (2 -> 3)")
    assert "restore the recipe or start a new run" in err and "\n" not in err
    assert sorted(p.name for p in list_checkpoints(run_dir)) == before
    # a change that leaves model and objective alone (a longer run) resumes
    recipe.write_text(original.replace("steps: 6", "steps: 7"))
    assert main(["resume", str(run_dir)]) == 0


def test_resume_refuses_a_checkpoint_of_another_major_version(tmp_path, tiny_config, capsys):
    run_dir = tmp_path / "run"
    create_run_dir(run_dir, tiny_config)
    pretrain(tiny_config, run_dir)
    for checkpoint in list_checkpoints(run_dir):
        identity = checkpoint / "identity.json"
        text = identity.read_text()
        version = json.loads(text)["accelvit"]
        identity.write_text(text.replace(f'"{version}"', f'"9{version[1:]}"'))
        manifest = json.loads((checkpoint / "manifest.json").read_text())  # as that version wrote it
        manifest["files"]["identity.json"] = {
            "size": identity.stat().st_size,
            "sha256": file_digest(identity),
        }
        (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "was written by accelvit 9" in err and "(another major version)" in err


def test_resume_of_a_checkpoint_that_does_not_exist(tmp_path, capsys):
    assert main(["resume", str(tmp_path / "nowhere")]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path, tiny_config):
    run_dir = tmp_path / "run"
    create_run_dir(run_dir, tiny_config)
    pretrain(tiny_config, run_dir)
    uninterrupted = (run_dir / "metrics.jsonl").read_text()
    # a power loss after the step-3 checkpoint: two more lines, the last one torn mid-append
    lines = uninterrupted.splitlines(keepends=True)
    (run_dir / "metrics.jsonl").write_text("".join(lines[:5]) + lines[5][:17])
    shutil.rmtree(run_dir / "checkpoints/step_6")
    with pytest.warns(UserWarning, match="dropping a line that is not JSON"):
        pretrain(tiny_config, run_dir, resume=True)
    resumed = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in resumed] == [
        (r["step"], r["loss"]) for r in map(json.loads, uninterrupted.splitlines())
    ]


def test_overwrite_replaces_a_run_but_refuses_any_other_folder(tmp_path, tiny_recipe, capsys):
    run_dir = tmp_path / "run"
    assert main(["pretrain", str(tiny_recipe), "-o", str(run_dir)]) == 0
    (run_dir / "stale.txt").write_text("from the old run")
    assert main(["pretrain", str(tiny_recipe), "-o", str(run_dir), "--overwrite"]) == 0
    assert not (run_dir / "stale.txt").exists() and (run_dir / "checkpoints/step_6").is_dir()
    project = tmp_path / "project"
    project.mkdir()
    (project / "thesis.tex").write_text("years of work")
    assert main(["pretrain", str(tiny_recipe), "-o", str(project), "--overwrite"]) == 2
    assert (project / "thesis.tex").read_text() == "years of work" and len(list(project.iterdir())) == 1


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        ("flip", "model.safetensors changed since it was saved"),
        ("zero_rng", "random_states_0.pkl changed since it was saved"),
        ("step", "trainer_state.json changed since it was saved"),
    ],
)
def test_silent_corruption_is_caught_by_content_hash(tmp_path, tiny_config, damage, why):
    run_dir = tmp_path / "run"
    create_run_dir(run_dir, tiny_config)
    pretrain(tiny_config, run_dir)
    uninterrupted = (run_dir / "checkpoints/step_6/model.safetensors").read_bytes()
    newest = run_dir / "checkpoints/step_6"
    if damage == "flip":  # one byte flipped in the weights, same size
        data = bytearray((newest / "model.safetensors").read_bytes())
        data[-10] ^= 0xFF
        (newest / "model.safetensors").write_bytes(bytes(data))
    elif damage == "zero_rng":  # the RNG state zeroed, same size
        rng = newest / "random_states_0.pkl"
        rng.write_bytes(bytes(rng.stat().st_size))
    else:  # a trainer state whose step disagrees with its folder, same size
        state = newest / "trainer_state.json"
        state.write_text(state.read_text().replace('"step": 6', '"step": 9'))
    with pytest.warns(UserWarning, match=why):
        assert latest_checkpoint(run_dir).name == "step_3"
    with pytest.warns(UserWarning, match=why):
        pretrain(tiny_config, run_dir, resume=True)  # from step 3, bit for bit
    assert (run_dir / "checkpoints/step_6/model.safetensors").read_bytes() == uninterrupted


def test_an_intact_rng_state_that_cannot_be_loaded_is_passed_over_not_an_info_line(tmp_path, tiny_config):
    # accelerate logs a failed RNG load at info level and goes on: the resume would silently not be
    # exact. A file that matches its manifest (saved so) but holds no RNG state sends the resume to
    # the checkpoint before, which then gives the same run bit for bit.
    from accelvit.checkpoint import MANIFEST, file_digest

    run_dir = tmp_path / "run"
    create_run_dir(run_dir, tiny_config)
    pretrain(tiny_config, run_dir)
    newest = run_dir / "checkpoints/step_6"
    rng = newest / "random_states_0.pkl"
    torch.save({"numpy_random_seed": None}, rng)
    manifest = json.loads((newest / MANIFEST).read_text())
    manifest["files"]["random_states_0.pkl"] = {"size": rng.stat().st_size, "sha256": file_digest(rng)}
    (newest / MANIFEST).write_text(json.dumps(manifest))
    before = (newest / "model.safetensors").read_bytes()
    with pytest.warns(
        UserWarning, match=r"step_6' is damaged: random_states_0.pkl cannot be loaded \(KeyError"
    ):
        pretrain(tiny_config, run_dir, resume=True)
    assert (newest / "model.safetensors").read_bytes() == before


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(tmp_path, tiny_config):
    run_dir = tmp_path / "run"
    create_run_dir(run_dir, tiny_config)
    pretrain(tiny_config, run_dir)
    for checkpoint in list_checkpoints(run_dir):
        (checkpoint / "model.safetensors").write_bytes(
            b"x" * (checkpoint / "model.safetensors").stat().st_size
        )
    with pytest.warns(UserWarning), pytest.raises(ConfigError, match="every checkpoint is damaged"):
        pretrain(tiny_config, run_dir, resume=True)


def test_weights_that_are_no_longer_finite_are_not_saved_as_the_last_good_state(tmp_path, tiny_config):
    from accelerate import Accelerator

    from accelvit.build import build_model
    from accelvit.checkpoint import TrainState, run_identity
    from accelvit.train import _stop_nonfinite

    run_dir = tmp_path / "run"
    create_run_dir(run_dir, tiny_config)
    pretrain(tiny_config, run_dir)
    model = build_model(tiny_config)
    with torch.no_grad():
        model.backbone.blocks[0].attn.qkv.weight[0, 0] = float("inf")  # an update blew a weight up
    state, nan = TrainState(step=7), torch.tensor(float("nan"))
    with pytest.raises(NonFiniteError, match=r"the weights are no longer finite; last good state: .*step_6$"):
        _stop_nonfinite(
            Accelerator(cpu=True),
            model,
            run_dir,
            state,
            tiny_config.train,
            run_identity(tiny_config),
            nan,
            nan,
        )
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_3", "step_6"]  # nothing saved


def test_a_second_command_on_a_run_in_use_gets_one_line(tmp_path, tiny_recipe, capsys):
    import multiprocessing

    from accelvit.checkpoint import run_lock

    run_dir = tmp_path / "run"
    assert main(["pretrain", str(tiny_recipe), "-o", str(run_dir), "--set", "train.steps=3"]) == 0
    ready, release = multiprocessing.Event(), multiprocessing.Event()

    def hold() -> None:  # another accelvit process working in the run
        with run_lock(run_dir):
            ready.set()
            release.wait(60)

    holder = multiprocessing.get_context("fork").Process(target=hold)
    holder.start()
    try:
        assert ready.wait(60)
        before = (run_dir / "metrics.jsonl").read_text()
        capsys.readouterr()
        assert main(["resume", str(run_dir)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"'{run_dir}' is in use by accelvit pid {holder.pid}" in err
        assert (run_dir / "metrics.jsonl").read_text() == before
    finally:
        release.set()
        holder.join(60)
    assert main(["resume", str(run_dir)]) == 0  # the lock goes with its holder


def test_sigterm_to_the_process_group_stops_with_a_checkpoint(tmp_path, tiny_recipe):
    run_dir = tmp_path / "run"
    args = [
        sys.executable, "-m", "accelvit.cli", "pretrain", str(tiny_recipe), "-o", str(run_dir),
        "--set", "train.steps=100000", "--set", "train.checkpoint_every=100000", "--set", "data.workers=2",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    metrics, deadline = run_dir / "metrics.jsonl", time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)  # as a cluster scheduler does: the loader workers get it too
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    (checkpoint,) = list_checkpoints(run_dir)
    assert "stopped at step" in out and "resume with" in out and checkpoint.name.startswith("step_")


def test_an_exit_with_a_loader_still_open_does_not_wait_on_its_workers(tmp_path):
    # A budgeted run's sampler has no end, so its loader is never exhausted. When one is still open at
    # exit (a benchmark stopped by another run's lock), multiprocessing ends the daemonic workers with
    # SIGTERM from their parent and waits for them: they must obey that one.
    script = tmp_path / "exit.py"
    script.write_text(
        "import torch\n"
        "from accelvit.data import StepBatchSampler, build_loader\n"
        "images = [(torch.zeros(1, 4, 4), 0)] * 16\n"
        "loader = iter(build_loader(images, lambda x: [x], 2, StepBatchSampler(16, 4, 0, 0, None)))\n"
        "next(loader)\n"
        "raise SystemExit('stopped with the loader open')\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr == "stopped with the loader open\n"


def test_a_closed_stdout_never_costs_the_stop_checkpoint(tmp_path, tiny_recipe):
    run_dir = tmp_path / "run"
    args = [
        sys.executable, "-m", "accelvit.cli", "pretrain", str(tiny_recipe), "-o", str(run_dir),
        "--set", "train.steps=100000", "--set", "train.checkpoint_every=100000",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    metrics, deadline = run_dir / "metrics.jsonl", time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    proc.stdout.close()  # `| tee log`, with tee stopped by Ctrl-C before the run
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 0  # the stop message went nowhere; the run stopped cleanly
    (checkpoint,) = list_checkpoints(run_dir)
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] >= 3


# ---------------------------------------------------------------------------------------------
# Checkpoints as an attacker would write them: nothing read from a checkpoint may run code, and a
# file that does not load sends the resume to the checkpoint before, with one warning


class _RunsCode:
    """Unpickled, it would create the file `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _replace_in_checkpoint(checkpoint: Path, name: str, write) -> None:
    """Rewrite one file of a checkpoint and its manifest entry, as someone who can write both would."""
    from accelvit.checkpoint import MANIFEST

    write(checkpoint / name)
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    manifest["files"][name] = {
        "size": (checkpoint / name).stat().st_size,
        "sha256": file_digest(checkpoint / name),
    }
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", ["random_states_0.pkl", "optimizer.bin"])
def test_a_checkpoint_file_that_would_run_code_is_never_unpickled(tmp_path, tiny_config, name):
    import pickle

    run_dir, marker = tmp_path / "run", tmp_path / "pwned"
    create_run_dir(run_dir, tiny_config)
    pretrain(tiny_config, run_dir)
    uninterrupted = (run_dir / "checkpoints/step_6/model.safetensors").read_bytes()
    payload = pickle.dumps({"torch_manual_seed": _RunsCode(marker)})
    _replace_in_checkpoint(run_dir / "checkpoints/step_6", name, lambda p: p.write_bytes(payload))
    with pytest.warns(UserWarning, match=r"step_6' is damaged: .*; trying the one before"):
        pretrain(tiny_config, run_dir, resume=True)  # from step 3, bit for bit
    assert not marker.exists()
    assert (run_dir / "checkpoints/step_6/model.safetensors").read_bytes() == uninterrupted


@pytest.mark.parametrize("damage", ["nan_weights", "unknown_state_key"])
def test_a_checkpoint_that_loads_but_is_no_good_state_is_passed_over(tmp_path, tiny_config, damage):
    from safetensors.torch import save_file

    run_dir = tmp_path / "run"
    create_run_dir(run_dir, tiny_config)
    pretrain(tiny_config, run_dir)
    uninterrupted = (run_dir / "checkpoints/step_6/model.safetensors").read_bytes()
    newest = run_dir / "checkpoints/step_6"
    if damage == "nan_weights":  # the manifest agrees: the weights were NaN when saved
        weights = load_file(newest / "model.safetensors")
        weights = {
            k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in weights.items()
        }
        _replace_in_checkpoint(newest, "model.safetensors", lambda p: save_file(weights, p))
        why = "its weights are not finite"
    else:
        state = json.loads((newest / "trainer_state.json").read_text())
        state["from_a_newer_accelvit"] = 1
        _replace_in_checkpoint(newest, "trainer_state.json", lambda p: p.write_text(json.dumps(state)))
        why = "unreadable trainer_state.json"
    with pytest.warns(UserWarning, match=rf"step_6' is damaged: {why}.*trying the one before"):
        pretrain(tiny_config, run_dir, resume=True)
    assert (run_dir / "checkpoints/step_6/model.safetensors").read_bytes() == uninterrupted


def test_weights_of_another_model_without_identity_are_a_clean_refusal(tmp_path, tiny_config, capsys):
    run_dir = tmp_path / "run"
    create_run_dir(run_dir, tiny_config)
    pretrain(tiny_config, run_dir)
    for checkpoint in list_checkpoints(run_dir):  # written before identity.json existed
        (checkpoint / "identity.json").unlink()
        manifest = json.loads((checkpoint / "manifest.json").read_text())
        del manifest["files"]["identity.json"]
        (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    recipe = run_dir / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("embed_dim: 32", "embed_dim: 48"))
    capsys.readouterr()
    assert main(["resume", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("accelvit: error: resume refused: the weights of checkpoint") and "\n" not in err
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_3", "step_6"]


# ---------------------------------------------------------------------------------------------
# The run lock: --overwrite never deletes a live run; a killed run's orphaned workers do not hold it


def _hold_lock(run_dir: Path, ready, release) -> None:
    from accelvit.checkpoint import run_lock

    with run_lock(run_dir):
        ready.set()
        release.wait(60)


def test_overwrite_of_a_run_in_use_is_refused_and_deletes_nothing(tmp_path, tiny_recipe, capsys):
    import multiprocessing

    run_dir = tmp_path / "run"
    assert main(["pretrain", str(tiny_recipe), "-o", str(run_dir), "--set", "train.steps=3"]) == 0
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    context = multiprocessing.get_context("fork")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(run_dir, ready, release))  # a run still training
    holder.start()
    try:
        assert ready.wait(60)
        capsys.readouterr()
        assert main(["pretrain", str(tiny_recipe), "-o", str(run_dir), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"'{run_dir}' is in use by accelvit pid {holder.pid}" in err
        after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
        assert after == before
    finally:
        release.set()
        holder.join(60)
    assert main(["pretrain", str(tiny_recipe), "-o", str(run_dir), "--overwrite"]) == 0
    assert (run_dir / "checkpoints/step_6").is_dir() and not (run_dir / "checkpoints/step_3/x").exists()


def _lock_then_die_leaving_a_child(run_dir: Path, child_pid) -> None:
    import multiprocessing

    from accelvit.checkpoint import run_lock

    with run_lock(run_dir):
        worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
        worker.start()  # a loader worker, forked while the lock is held
        child_pid.value = worker.pid
        os._exit(9)  # as a kill -9: no cleanup, the worker lives on


def test_a_killed_runs_orphaned_workers_do_not_hold_its_lock(tmp_path, tiny_recipe):
    import multiprocessing

    from accelvit.checkpoint import run_lock

    run_dir = tmp_path / "run"
    context = multiprocessing.get_context("fork")
    child_pid = context.Value("i", 0)
    trainer = context.Process(target=_lock_then_die_leaving_a_child, args=(run_dir, child_pid))
    trainer.start()
    trainer.join(60)
    try:
        os.kill(child_pid.value, 0)  # the orphaned worker is still alive
        with run_lock(run_dir):  # and the run is free at once
            pass
    finally:
        os.kill(child_pid.value, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# Checkpoint folders that are not what their names say, prunes and saves cut short, full disks


def _trained(tmp_path, cfg) -> Path:
    run_dir = tmp_path / "run"
    create_run_dir(run_dir, cfg)
    pretrain(cfg, run_dir)
    return run_dir


def test_a_checkpoint_replaced_by_a_link_outside_the_run_is_neither_resumed_nor_written_through(
    tmp_path, tiny_config
):
    run_dir = _trained(tmp_path, tiny_config)
    outside = tmp_path / "elsewhere"
    shutil.move(run_dir / "checkpoints/step_6", outside)
    (run_dir / "checkpoints/step_6").symlink_to(outside, target_is_directory=True)
    before = {p.name: p.read_bytes() for p in outside.iterdir()}
    with pytest.warns(UserWarning, match="step_6 is a link, not a checkpoint of this run"):
        assert pretrain(tiny_config, run_dir, resume=True).step == 6  # from step_3, then saves step_6
    assert (run_dir / "checkpoints/step_6").is_dir() and not (run_dir / "checkpoints/step_6").is_symlink()
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == before  # the link's target untouched


@pytest.mark.parametrize("name", ["step_9", "step_6.bak"])
def test_a_renamed_checkpoint_falls_back_to_the_one_before(tmp_path, tiny_config, name):
    run_dir = _trained(tmp_path, tiny_config)
    (run_dir / "checkpoints/step_6").rename(run_dir / "checkpoints" / name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert pretrain(tiny_config, run_dir, resume=True).step == 6
    if name == "step_9":  # a step_N whose state names another step: damaged, passed over, kept
        assert any("its trainer_state.json says step 6" in str(w.message) for w in caught)
        assert (run_dir / "checkpoints/step_9").is_dir()
    assert (run_dir / "checkpoints" / name).is_dir()  # never deleted
    assert [p.name for p in list_checkpoints(run_dir)][-1] in ("step_6", "step_9")


def test_a_prune_cut_short_leaves_nothing_behind_after_the_next_resume(tmp_path, tiny_config, monkeypatch):
    import accelvit.checkpoint as checkpoint

    tiny_config.train.keep_checkpoints = 1
    real_remove = checkpoint._remove

    def killed_mid_prune(path):  # the prune's manifest is gone when the process dies
        if path.name == "step_3":
            raise KeyboardInterrupt
        real_remove(path)

    monkeypatch.setattr(checkpoint, "_remove", killed_mid_prune)
    run_dir = tmp_path / "run"
    create_run_dir(run_dir, tiny_config)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_config, run_dir)
    monkeypatch.setattr(checkpoint, "_remove", real_remove)
    left = run_dir / "checkpoints/step_3"
    assert left.is_dir() and not (left / "manifest.json").exists()
    with pytest.warns(UserWarning, match="step_3, left without its manifest by an interrupted prune"):
        pretrain(tiny_config, run_dir, resume=True)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_6"]


def test_a_lost_newest_manifest_is_warned_about_and_its_folder_moved_aside_not_deleted(tmp_path, tiny_config):
    run_dir = _trained(tmp_path, tiny_config)
    (run_dir / "checkpoints/step_6/manifest.json").unlink()
    files = sorted(p.name for p in (run_dir / "checkpoints/step_6").iterdir())
    with pytest.warns(UserWarning) as caught:
        assert pretrain(tiny_config, run_dir, resume=True).step == 6
    messages = [str(w.message) for w in caught]
    assert any("step_6 has no manifest.json: not resumed from, kept for inspection" in m for m in messages)
    assert any("moving" in m and "aside" in m for m in messages)
    (aside,) = (run_dir / "checkpoints").glob("damaged-step_6-*")
    assert sorted(p.name for p in aside.iterdir()) == files
    assert (run_dir / "checkpoints/step_6/manifest.json").is_file()  # saved again


def test_a_log_line_torn_after_its_checkpoint_was_saved_is_written_again(tmp_path, tiny_config):
    run_dir = _trained(tmp_path, tiny_config)
    uninterrupted = (run_dir / "metrics.jsonl").read_text()
    lines = uninterrupted.splitlines(keepends=True)
    (run_dir / "metrics.jsonl").write_text("".join(lines[:-1]) + lines[-1][:20])  # power loss mid-line
    with pytest.warns(UserWarning, match="writing again the line of step 6"):
        pretrain(tiny_config, run_dir, resume=True)
    assert (run_dir / "metrics.jsonl").read_text() == uninterrupted


def _immutable(path: Path):
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    return path


def test_a_run_directory_that_refuses_writes_is_one_line(tmp_path, tiny_recipe, capsys):
    run_dir = _trained(tmp_path, load_config(tiny_recipe))
    capsys.readouterr()
    frozen = sorted((str(p), p.stat().st_mtime_ns) for p in run_dir.rglob("*"))
    _immutable(run_dir)
    try:
        for argv in (
            ["resume", str(run_dir)],
            ["pretrain", str(tiny_recipe), "-o", str(run_dir / "new")],
            ["pretrain", str(tiny_recipe), "-o", str(run_dir), "--overwrite"],
        ):
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and err.endswith("not writable\n"), err
    finally:
        subprocess.run(["chattr", "-i", str(run_dir)], check=True)
    assert sorted((str(p), p.stat().st_mtime_ns) for p in run_dir.rglob("*")) == frozen


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(disk)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_during_a_save_says_so(small_disk, tiny_recipe, capsys):
    run_dir = small_disk / "run"
    assert main(["pretrain", str(tiny_recipe), "-o", str(run_dir)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"accelvit: stopped: could not write checkpoint {run_dir / 'checkpoints/step_3'}")
    assert "No space left on device" in err and err.endswith("no earlier checkpoint")
    assert not list((run_dir / "checkpoints").iterdir())


def test_resume_on_a_full_disk_is_one_line(tmp_path, small_disk, tiny_config, capsys):
    run_dir = _trained(tmp_path, tiny_config)
    shutil.rmtree(run_dir / "checkpoints/step_3")
    shutil.copytree(run_dir, small_disk / "run", ignore=shutil.ignore_patterns("step_*"))
    with open(small_disk / "fill", "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:  # the rest of the disk
            f.write(b"x" * 4096)
    assert main(["resume", str(small_disk / "run")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("accelvit: stopped: No space left on device"), err


def test_diagnose_reads_a_log_whose_last_line_was_torn(tmp_path, tiny_recipe, capsys):
    cfg = load_config(tiny_recipe, ["train.diagnostics_every=2"])
    run_dir = _trained(tmp_path, cfg)
    log = run_dir / "diagnostics.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:-1]) + lines[-1][:30])
    assert main(["diagnose", str(run_dir), "-o", str(tmp_path / "d.png")]) == 0
    assert (tmp_path / "d.png").is_file()
    log.write_text(lines[0][:30])
    assert main(["diagnose", str(run_dir), "-o", str(tmp_path / "e.png")]) == 2
    assert "holds no complete record" in capsys.readouterr().err


SLOW_EMBED = """
import sys, time
import accelvit.embed as embed

def slow(*args, **kwargs):
    print("extracting", flush=True)
    time.sleep(60)

embed.embed_folder = slow
sys.argv = ["accelvit", *sys.argv[1:]]
from accelvit.cli import run
run()
"""


def test_sigterm_during_embed_says_it_stopped_and_writes_nothing(tmp_path, tiny_config):
    run_dir = _trained(tmp_path, tiny_config)
    (tmp_path / "images").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "images/a.png")
    out = tmp_path / "e.npy"
    args = ["embed", str(run_dir), "--data", str(tmp_path / "images"), "-o", str(out), "--workers", "0"]
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_EMBED, *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "extracting"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert err.strip().splitlines()[-1] == "accelvit: stopped by SIGTERM: embed did not finish"
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))
