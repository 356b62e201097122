from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from accelvit.checkpoint import create_run_dir, list_checkpoints, verify_checkpoint
from accelvit.cli import main
from accelvit.config import ConfigError, load_config
from accelvit.train import pretrain

REPO = Path(__file__).resolve().parents[1]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def test_pretrain_logs_metrics_and_checkpoints(tmp_path, tiny_config):
    run_dir = tmp_path / "run"
    create_run_dir(run_dir, tiny_config)
    result = pretrain(tiny_config, run_dir)
    assert result.step == 6 and not result.stopped
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    required = {
        "step",
        "progress",
        "loss",
        "lr",
        "keep",
        "patch",
        "tokens",
        "images_per_s",
        "data_s",
        "step_s",
    }
    assert required <= set(records[0])
    # the curriculum as logged: keep 0.5 -> 1 linearly, patch 8 for the first half, then 4
    assert [r["patch"] for r in records] == [8, 8, 8, 4, 4, 4]
    assert [r["keep"] for r in records] == pytest.approx([0.5 + 0.5 * s / 6 for s in range(6)])
    assert [r["tokens"] for r in records] == [
        1 + max(1, round(r["keep"] * (16 // r["patch"]) ** 2)) for r in records
    ]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_3", "step_6"]
    assert load_config(run_dir / "recipe.yaml") == tiny_config


@pytest.mark.parametrize("stem", [[], [8]], ids=["patchify", "conv-stem"])
def test_resume_is_bit_exact(tmp_path, tiny_config, stem):
    tiny_config.model.stem = stem  # the stem's batch-norm statistics must come back too
    run_dir = tmp_path / "run"
    create_run_dir(run_dir, tiny_config)
    pretrain(tiny_config, run_dir)
    uninterrupted = losses(run_dir)
    final_weights = load_file(str(run_dir / "checkpoints/step_6/model.safetensors"))

    # Simulate a run that died after its step-3 checkpoint, with a few steps logged past it.
    shutil.rmtree(run_dir / "checkpoints/step_6")
    result = pretrain(tiny_config, run_dir, resume=True)
    assert result.step == 6
    assert losses(run_dir) == uninterrupted  # bit-for-bit, including steps 4-6 recomputed
    resumed_weights = load_file(str(run_dir / "checkpoints/step_6/model.safetensors"))
    assert final_weights.keys() == resumed_weights.keys()
    assert all(torch.equal(final_weights[k], resumed_weights[k]) for k in final_weights)


def test_run_dir_holding_a_run_is_refused(tmp_path, tiny_config):
    run_dir = tmp_path / "run"
    create_run_dir(run_dir, tiny_config)
    with pytest.raises(ConfigError, match="already holds a run"):
        create_run_dir(run_dir, tiny_config)


def test_a_run_stopped_before_its_first_checkpoint_resumes_from_step_0(tmp_path, tiny_config, capsys):
    fresh = tmp_path / "fresh"
    create_run_dir(fresh, tiny_config)
    pretrain(tiny_config, fresh)
    run_dir = tmp_path / "run"
    create_run_dir(run_dir, tiny_config)
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 9.9}\n')  # logged, then killed
    result = pretrain(tiny_config, run_dir, resume=True)
    assert "has no checkpoint yet: starting it from step 0" in capsys.readouterr().out
    assert result.step == 6 and losses(run_dir) == losses(fresh)  # as if it had just been created


def test_export_loads_into_timm(tmp_path, tiny_recipe):
    import timm

    run_dir, out = tmp_path / "run", tmp_path / "backbone.safetensors"
    assert main(["pretrain", str(tiny_recipe), "-o", str(run_dir)]) == 0
    assert main(["export", str(run_dir), "-o", str(out)]) == 0

    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    vit = timm.create_model(meta["arch"], **json.loads(meta["timm_kwargs"]))
    weights = load_file(str(out))
    vit.load_state_dict(weights, strict=True)
    trained = load_file(str(run_dir / "checkpoints/step_6/model.safetensors"))
    assert torch.equal(vit.patch_embed.proj.weight, trained["backbone.patch_embed.proj.weight"])
    assert vit(torch.randn(2, 3, 16, 16)).shape == (2, 32)


def test_export_as_a_timm_folder_loads_with_its_preprocessing(tmp_path, tiny_recipe, capsys):
    import timm
    from timm.data import resolve_data_config

    from accelvit.export import load_export

    run_dir, folder, file = tmp_path / "run", tmp_path / "backbone", tmp_path / "backbone.safetensors"
    assert main(["pretrain", str(tiny_recipe), "-o", str(run_dir)]) == 0
    assert main(["export", str(run_dir), "-o", str(folder)]) == 0
    assert main(["export", str(run_dir), "-o", str(file)]) == 0
    vit = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    data = resolve_data_config({}, model=vit)
    assert data["input_size"] == (3, 16, 16) and data["crop_pct"] == 1.0
    assert data["mean"] == pytest.approx((0.485, 0.456, 0.406)) and data["std"] == pytest.approx((0.229, 0.224, 0.225))
    exported, model = load_export(file)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(vit(x), exported(x)) and vit(x).shape == (2, 32)
    assert model.image_size == 16
    # a convolutional stem is not timm's: the folder format is refused, the file carries it
    stem = tmp_path / "stem"
    assert main(["pretrain", str(tiny_recipe), "-o", str(stem), "--set", "model.stem=[8]"]) == 0
    capsys.readouterr()
    assert main(["export", str(stem), "-o", str(tmp_path / "stem_folder")]) == 2
    assert "timm's folder format holds plain ViTs" in capsys.readouterr().err
    assert not (tmp_path / "stem_folder").exists()
    assert main(["export", str(stem), "-o", str(tmp_path / "stem.safetensors")]) == 0
    vit, _ = load_export(tmp_path / "stem.safetensors")
    assert vit(x).shape == (2, 32)


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path, tiny_recipe):
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "accelvit.cli",
            "pretrain",
            str(tiny_recipe),
            "-o",
            str(run_dir),
            "--set",
            "train.steps=100000",
            "--set",
            "train.checkpoint_every=100000",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    (checkpoint,) = list_checkpoints(run_dir)
    verify_checkpoint(checkpoint)
    step = json.loads((checkpoint / "trainer_state.json").read_text())["step"]
    assert 3 <= step < 100000
    assert losses(run_dir)[-1][0] == step
    assert f"stopped at step {step}/100000" in out
    assert f"resume with: accelvit resume {run_dir}" in out


def test_bf16_mixed_precision_trains(tmp_path, tiny_recipe):
    cfg = load_config(tiny_recipe, ["train.precision=bf16", "train.steps=2"])
    run_dir = tmp_path / "run"
    create_run_dir(run_dir, cfg)
    assert pretrain(cfg, run_dir).step == 2
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in losses(run_dir))


def test_several_processes_need_an_explicit_run_dir(tiny_recipe, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["pretrain", str(tiny_recipe)]) == 2
    assert "-o RUN_DIR is required when several processes" in capsys.readouterr().err


def test_resumed_metrics_equal_uninterrupted_when_log_every_does_not_divide_the_checkpoint(tmp_path, tiny_config):
    tiny_config.train.log_every = 4  # lines at steps 4 and 6; the resume starts from step 3
    run_dir = tmp_path / "run"
    create_run_dir(run_dir, tiny_config)
    pretrain(tiny_config, run_dir)
    uninterrupted = losses(run_dir)
    assert [step for step, _ in uninterrupted] == [4, 6]
    shutil.rmtree(run_dir / "checkpoints/step_6")
    pretrain(tiny_config, run_dir, resume=True)
    assert losses(run_dir) == uninterrupted  # the line at step 4 averages steps 1-4 again


SLOW_SETUP = """
import sys, time
import accelvit.build as build

real_load = build.load_dataset

def load(*args, **kwargs):
    print("loading", flush=True)
    time.sleep(3)  # the SIGTERM arrives here, before the loop
    return real_load(*args, **kwargs)

build.load_dataset = load
from accelvit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_during_setup_stops_at_the_first_checkpoint(tmp_path, tiny_recipe):
    harness, run_dir = tmp_path / "harness.py", tmp_path / "run"
    harness.write_text(SLOW_SETUP)
    args = [sys.executable, str(harness), "pretrain", str(tiny_recipe), "-o", str(run_dir)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("run directory: ")
    assert proc.stdout.readline().strip() == "loading"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "stopped at step 1/6" in out and [p.name for p in list_checkpoints(run_dir)] == ["step_1"]
