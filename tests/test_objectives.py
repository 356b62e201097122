from __future__ import annotations

import copy
import json

import pytest
import torch

from accelvit.backbone import build_backbone
from accelvit.checkpoint import create_run_dir
from accelvit.config import ModelConfig, ObjectiveConfig, load_config
from accelvit.objectives import OBJECTIVES
from accelvit.objectives.dino import local_crop_size
from accelvit.objectives.momentum import momentum_at
from accelvit.setting import Setting, patch_for_size
from accelvit.train import pretrain

MODEL = ModelConfig(image_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
HEADS = {"hidden_dim": 32, "out_dim": 16, "bottleneck_dim": 8}


def build(name: str, dropout_views: str = "query", **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ObjectiveConfig(name=name, **HEADS, **kwargs)
    return OBJECTIVES[name].build(cfg, build_backbone(MODEL), dropout_views)


def views(name: str, batch: int = 4, local: int = 0) -> list[torch.Tensor]:
    out = [torch.randn(batch, 3, 16, 16) for _ in range(2)]
    return out + [torch.randn(batch, 3, 8, 8) for _ in range(local)]


def record_lengths(module: torch.nn.Module) -> list[tuple[int, int]]:
    """(batch, sequence length) of every call of the module's first block."""
    calls: list[tuple[int, int]] = []
    module.blocks[0].register_forward_pre_hook(lambda _, args: calls.append(tuple(args[0].shape[:2])))
    return calls


@pytest.mark.parametrize(
    ("dropout_views", "student", "momentum"),
    [("query", [(4, 3)] * 2, [(4, 5)] * 2), ("all", [(4, 3)] * 2, [(4, 3)] * 2)],
)
def test_mocov3_drops_tokens_in_queries_only(dropout_views, student, momentum):
    model = build("mocov3", dropout_views)
    s, m = record_lengths(model.backbone), record_lengths(model.momentum_backbone)
    model(views("mocov3"), Setting(0.5, 8), 0.0)  # 2x2 grid: 4 patches, keep 2 -> 3 tokens
    assert (s, m) == (student, momentum)


def test_simclr_drops_tokens_in_both_views():
    model = build("simclr")
    s = record_lengths(model.backbone)
    model(views("simclr"), Setting(0.25, 4), 0.0)  # 16 patches, keep 4 -> 5 tokens
    assert s == [(8, 5)]


def test_dino_student_sees_all_crops_compressed_teacher_global_full():
    model = build("dino", local_crops=3)
    s, t = record_lengths(model.backbone), record_lengths(model.teacher_backbone)
    model(views("dino", local=3), Setting(0.5, 8), 0.0)
    # global 16 px at patch 8: 4 patches -> 1 + 2 kept; local 8 px at patch 8: 1 patch -> 1 + 1
    assert s == [(8, 3), (12, 2)]
    assert t == [(8, 5)]


def test_dino_without_local_crops():
    model = build("dino")
    loss = model(views("dino"), Setting(1.0, 4), 0.5)
    assert loss.ndim == 0 and torch.isfinite(loss)


@pytest.mark.parametrize(
    ("patch", "size", "base", "expected"),
    [(4, 8, 4, 4), (8, 8, 4, 8), (16, 8, 4, 8), (32, 96, 16, 32), (28, 96, 16, 24), (56, 96, 16, 48)],
)
def test_local_crop_patch_rule(patch, size, base, expected):
    assert patch_for_size(patch, size, base) == expected


def test_local_crop_size_default():
    assert local_crop_size(224, 16) == 96
    assert local_crop_size(32, 4) == 12
    assert local_crop_size(16, 8) == 8


@pytest.mark.parametrize("name", ["mocov3", "dino"])
def test_momentum_update_is_the_ema_formula(name):
    model = build(name, momentum=0.9)
    student, teacher = (
        (model.backbone, model.momentum_backbone)
        if name == "mocov3"
        else (model.backbone, model.teacher_backbone)
    )
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    before = copy.deepcopy(teacher.state_dict())
    model.update_momentum(0.5)
    m = momentum_at(0.9, 0.5)
    assert m == pytest.approx(1 - 0.1 * 0.5)  # cosine halfway between 0.9 and 1
    for (name_, p), s in zip(teacher.named_parameters(), student.parameters(), strict=True):
        assert torch.allclose(p, m * before[name_] + (1 - m) * s, atol=1e-6)


@pytest.mark.parametrize("name", ["mocov3", "dino"])
def test_momentum_encoders_change_only_through_ema(tmp_path, tiny_recipe, name):
    from safetensors.torch import load_file

    cfg = load_config(
        tiny_recipe,
        [
            f"objective.name={name}",
            "objective.bottleneck_dim=8",
            "train.checkpoint_every=1",
            "train.steps=2",
            "objective.momentum=0.9",
        ],
    )
    run_dir = tmp_path / "run"
    create_run_dir(run_dir, cfg)
    pretrain(cfg, run_dir)
    w1 = load_file(str(run_dir / "checkpoints/step_1/model.safetensors"))
    w2 = load_file(str(run_dir / "checkpoints/step_2/model.safetensors"))
    prefix = "momentum_" if name == "mocov3" else "teacher_"
    m = momentum_at(0.9, 1 / 2)  # the update after step 2 uses the progress of step 2's start
    pairs = [(k, k.removeprefix(prefix)) for k in w2 if k.startswith(prefix)]
    assert pairs
    for teacher_key, student_key in pairs:
        if w2[teacher_key].is_floating_point() and "running" not in teacher_key:
            expected = m * w1[teacher_key] + (1 - m) * w2[student_key]
            assert torch.allclose(w2[teacher_key], expected, atol=1e-6), teacher_key


@pytest.mark.parametrize("name", ["simclr", "mocov3", "dino"])
def test_momentum_encoders_get_no_gradients(name):
    model = build(name, local_crops=2 if name == "dino" else 0)
    loss = model(views(name, local=2 if name == "dino" else 0), Setting(0.5, 8), 0.1)
    loss.backward()
    for key, p in model.named_parameters():
        if key.startswith(("momentum_", "teacher_")):
            assert not p.requires_grad and p.grad is None, key
        elif not key.endswith("last_layer.weight_g"):  # DINO's normalised last layer is fixed
            assert p.requires_grad, key


@pytest.mark.parametrize("name", ["mocov3", "dino"])
def test_resume_is_bit_exact(tmp_path, tiny_recipe, name):
    import shutil

    from safetensors.torch import load_file

    overrides = [f"objective.name={name}", "objective.bottleneck_dim=8"]
    if name == "dino":
        overrides += ["objective.local_crops=2", "objective.local_crop_size=8"]
    cfg = load_config(tiny_recipe, overrides)
    run_dir = tmp_path / "run"
    create_run_dir(run_dir, cfg)
    pretrain(cfg, run_dir)

    def losses() -> list[tuple[int, float]]:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"]) for r in map(json.loads, lines)]

    uninterrupted = losses()
    final = load_file(str(run_dir / "checkpoints/step_6/model.safetensors"))
    shutil.rmtree(run_dir / "checkpoints/step_6")
    pretrain(cfg, run_dir, resume=True)
    assert len(uninterrupted) == 6
    assert losses() == uninterrupted
    # the momentum encoder's EMA (and DINO's centre) come back bit for bit too
    resumed = load_file(str(run_dir / "checkpoints/step_6/model.safetensors"))
    ema = [k for k in final if k.startswith(("momentum_", "teacher_", "criterion."))]
    assert ema and final.keys() == resumed.keys()
    assert all(torch.equal(final[k], resumed[k]) for k in final)


FMNIST_RUN = {
    "simclr": ["objective.temperature=0.2", "train.steps=60"],
    "mocov3": ["objective.temperature=0.2", "objective.momentum=0.9", "train.steps=60"],
}


def fashion_mnist_run(tmp_path, recipe, root, compressed: bool, *overrides: str) -> list[dict]:
    """Metrics records of a small run on 512 Fashion-MNIST images, full input or compressed."""
    schedule = (
        ["schedule.keep=0.5", "schedule.patch=8"] if compressed else ["schedule.keep=1.0", "schedule.patch=4"]
    )
    cfg = load_config(
        recipe,
        [
            "data.dataset=fashion-mnist",
            f"data.root={root}",
            "data.limit=512",
            "train.batch_size=32",
            "train.checkpoint_every=100",
            "optim.warmup=0.1",
            *schedule,
            *overrides,
        ],
    )
    run_dir = tmp_path / "run"
    create_run_dir(run_dir, cfg)
    pretrain(cfg, run_dir)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("compressed", [False, True], ids=["full", "compressed"])
def test_small_dino_run_does_not_collapse(tmp_path, tiny_recipe, fashion_mnist, compressed):
    # The reference's guards against collapse at small scale: free prototype norms, the prototype layer
    # frozen at first, a sharp teacher, clipping, a slow teacher.
    records = fashion_mnist_run(
        tmp_path,
        tiny_recipe,
        fashion_mnist,
        compressed,
        "objective.name=dino",
        "objective.out_dim=256",
        "objective.hidden_dim=64",
        "objective.bottleneck_dim=32",
        "objective.momentum=0.99",
        "objective.norm_last_layer=false",
        "objective.freeze_last_layer=0.1",
        "optim.lr=0.0005",
        "optim.clip_grad=3.0",
        "train.steps=80",
        "train.log_every=5",
    )
    assert len(records) == 16
    for r in records:  # feature_std is 0 when collapsed; healthy about 1/sqrt(32) = 0.18
        assert r["feature_std"] > 0.02 and r["prototypes_used"] >= 2 and r["teacher_entropy"] < 0.95, r


@pytest.mark.parametrize("compressed", [False, True], ids=["full", "compressed"])
@pytest.mark.parametrize("name", ["simclr", "mocov3"])
def test_loss_goes_down_on_fashion_mnist(tmp_path, tiny_recipe, fashion_mnist, name, compressed):
    records = fashion_mnist_run(
        tmp_path, tiny_recipe, fashion_mnist, compressed, f"objective.name={name}", "optim.lr=0.002", *FMNIST_RUN[name]
    )
    losses = [r["loss"] for r in records]
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < first * 0.97, (first, last)
