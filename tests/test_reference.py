"""The objectives' reference options (issue: MoCo-v3 and DINO that learn) against their references."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from accelvit.backbone import build_backbone
from accelvit.build import build_optimizer
from accelvit.checkpoint import create_run_dir
from accelvit.cli import main
from accelvit.compress import forward_features
from accelvit.config import ModelConfig, ObjectiveConfig, OptimConfig, load_config
from accelvit.monitor import collapse_warning, feature_monitors, teacher_monitors
from accelvit.objectives import OBJECTIVES
from accelvit.schedule import weight_decay_at
from accelvit.setting import Setting
from accelvit.train import pretrain

MODEL = ModelConfig(image_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)


def reference_mlp(num_layers: int, input_dim: int, mlp_dim: int, output_dim: int) -> nn.Sequential:
    """moco-v3's `MoCo._build_mlp` (moco/builder.py), written out as the test's oracle."""
    mlp: list[nn.Module] = []
    for layer in range(num_layers):
        dim1 = input_dim if layer == 0 else mlp_dim
        dim2 = output_dim if layer == num_layers - 1 else mlp_dim
        mlp.append(nn.Linear(dim1, dim2, bias=False))
        if layer < num_layers - 1:
            mlp += [nn.BatchNorm1d(dim2), nn.ReLU(inplace=True)]
        else:
            mlp.append(nn.BatchNorm1d(dim2, affine=False))
    return nn.Sequential(*mlp)


def test_mocov3_equals_the_reference_builder_forward_and_gradient():
    torch.manual_seed(0)
    cfg = ObjectiveConfig(name="mocov3", hidden_dim=48, out_dim=16, temperature=0.2)
    model = OBJECTIVES["mocov3"].build(cfg, build_backbone(MODEL), "query")

    # The reference's modules, holding the same weights: base encoder = ViT + 3-layer projector.
    base = nn.Sequential(copy.deepcopy(model.backbone), reference_mlp(3, 32, 48, 16))
    predictor = reference_mlp(2, 16, 48, 16)
    momentum = copy.deepcopy(base)
    base[1].load_state_dict(model.projection.layers.state_dict())
    predictor.load_state_dict(model.prediction.layers.state_dict())
    momentum[1].load_state_dict(model.momentum_projection.layers.state_dict())

    def ctr_loss(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        q, k = nn.functional.normalize(q, dim=1), nn.functional.normalize(k, dim=1)
        logits = torch.einsum("nc,mc->nm", [q, k]) / cfg.temperature
        return nn.functional.cross_entropy(logits, torch.arange(len(q))) * (2 * cfg.temperature)

    x1, x2 = torch.randn(6, 3, 16, 16), torch.randn(6, 3, 16, 16)
    q1, q2 = predictor(base(x1)), predictor(base(x2))
    with torch.no_grad():
        k1, k2 = momentum(x1), momentum(x2)
    expected = ctr_loss(q1, k2) + ctr_loss(q2, k1)
    expected.backward()

    loss = model([x1, x2], Setting(1.0, 4), 0.0)
    loss.backward()
    assert torch.allclose(loss, expected, atol=1e-6)
    ours = dict(model.backbone.named_parameters())
    for name, p in base[0].named_parameters():
        assert torch.allclose(ours[name].grad, p.grad, atol=1e-6), name
    assert model.projection.layers[-1].weight is None  # the last batch norm has no affine parameters
    assert model.prediction.layers[-1].weight is None


def test_sincos_position_embedding_and_frozen_projection_stay_fixed(tmp_path, tiny_recipe):
    from accelerate.utils import set_seed
    from timm.layers import build_sincos2d_pos_embed

    cfg = load_config(tiny_recipe, ["model.pos_embed=sincos", "model.freeze_patch_embed=true"])
    set_seed(cfg.train.seed)  # as pretrain does: the same initial weights
    vit = build_backbone(cfg.model)
    table = build_sincos2d_pos_embed([4, 4], 32)
    assert torch.equal(vit.pos_embed[0, 1:], table) and torch.equal(vit.pos_embed[0, 0], torch.zeros(32))
    assert not vit.pos_embed.requires_grad and not vit.patch_embed.proj.weight.requires_grad
    assert forward_features(vit, torch.randn(2, 3, 16, 16), Setting(1.0, 8)).shape == (2, 32)

    run_dir = tmp_path / "run"
    create_run_dir(run_dir, cfg)
    pretrain(cfg, run_dir)  # patch 8 then 4: both resampled from the frozen base
    trained = load_file(str(run_dir / "checkpoints/step_6/model.safetensors"))
    for key in ("pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"):
        assert torch.equal(trained[f"backbone.{key}"], vit.state_dict()[key]), key
    assert not torch.equal(trained["backbone.blocks.0.attn.qkv.weight"], vit.blocks[0].attn.qkv.weight)


def test_dino_last_layer_is_frozen_for_its_span_then_trains(tmp_path, tiny_recipe):
    cfg = load_config(
        tiny_recipe,
        [
            "objective.name=dino",
            "objective.bottleneck_dim=8",
            "objective.norm_last_layer=false",
            "objective.freeze_last_layer=0.5",
            "train.checkpoint_every=1",
            "train.keep_checkpoints=10",
        ],
    )
    run_dir = tmp_path / "run"
    create_run_dir(run_dir, cfg)
    pretrain(cfg, run_dir)

    def last_layer(step: int) -> dict[str, torch.Tensor]:
        w = load_file(str(run_dir / f"checkpoints/step_{step}/model.safetensors"))
        return {k: v for k, v in w.items() if k.startswith("head.last_layer.")}

    frozen = [last_layer(s) for s in (1, 2, 3)]  # steps starting at progress 0, 1/6, 2/6 < 0.5
    assert {"head.last_layer.weight_g", "head.last_layer.weight_v"} <= frozen[0].keys()
    for later in frozen[1:]:
        assert all(torch.equal(frozen[0][k], later[k]) for k in later)
    after = last_layer(4)  # the step starting at progress 0.5 updates it
    assert all(not torch.equal(frozen[0][k], after[k]) for k in after)
    other = load_file(str(run_dir / "checkpoints/step_1/model.safetensors"))["head.layers.0.weight"]
    first = load_file(str(run_dir / "checkpoints/step_2/model.safetensors"))["head.layers.0.weight"]
    assert not torch.equal(other, first)  # the rest of the head trains throughout


def test_norm_last_layer_fixes_the_prototype_norms():
    def trainable(norm: bool) -> set[str]:
        cfg = ObjectiveConfig(name="dino", hidden_dim=16, bottleneck_dim=8, out_dim=12, norm_last_layer=norm)
        model = OBJECTIVES["dino"].build(cfg, build_backbone(MODEL), "query")
        return {k for k, p in model.head.last_layer.named_parameters() if p.requires_grad}

    assert trainable(True) == {"weight_v"}
    assert trainable(False) == {"weight_g", "weight_v"}


def test_head_batch_norm_normalises_the_hidden_layers_of_both_heads():
    cfg = ObjectiveConfig(name="dino", hidden_dim=16, bottleneck_dim=8, out_dim=12, head_batch_norm=True)
    model = OBJECTIVES["dino"].build(cfg, build_backbone(MODEL), "query")
    for head in (model.head, model.teacher_head):
        norms = [m for m in head.modules() if isinstance(m, nn.BatchNorm1d)]
        assert [n.num_features for n in norms] == [16, 16]
    plain = OBJECTIVES["dino"].build(replace(cfg, head_batch_norm=False), build_backbone(MODEL), "query")
    assert not any(isinstance(m, nn.BatchNorm1d) for m in plain.head.modules())


def test_weight_decay_schedule_values():
    cfg = OptimConfig(weight_decay=0.04, weight_decay_end=0.4)
    assert weight_decay_at(cfg, 0.0) == pytest.approx(0.04)
    assert weight_decay_at(cfg, 0.5) == pytest.approx(0.22)
    assert weight_decay_at(cfg, 0.25) == pytest.approx(0.4 - 0.36 * (1 + math.cos(math.pi / 4)) / 2)
    assert weight_decay_at(cfg, 1.0) == pytest.approx(0.4)
    assert weight_decay_at(OptimConfig(weight_decay=0.05), 0.7) == 0.05


def test_the_loop_applies_the_weight_decay_schedule(tmp_path, tiny_recipe):
    cfg = load_config(tiny_recipe, ["optim.weight_decay=0.04", "optim.weight_decay_end=0.4"])
    run_dir = tmp_path / "run"
    create_run_dir(run_dir, cfg)
    pretrain(cfg, run_dir)
    groups = torch.load(run_dir / "checkpoints/step_6/optimizer.bin", weights_only=False)["param_groups"]
    # the last step started at progress 5/6; biases and norms never decay
    assert groups[0]["weight_decay"] == pytest.approx(weight_decay_at(cfg.optim, 5 / 6))
    assert groups[1]["weight_decay"] == 0.0


def test_value_residual_mixing_gets_no_weight_decay():
    model = build_backbone(ModelConfig(**{**MODEL.__dict__, "value_residual": True}))
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.1))
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    assert model.value_lambdas.ndim == 2 and id(model.value_lambdas) not in decayed
    assert id(model.blocks[0].attn.qkv.weight) in decayed
    assert id(model.pos_embed) not in decayed


def test_collapse_monitors_read_zero_when_collapsed_and_one_over_sqrt_d_when_spread():
    d = 64
    constant = torch.ones(256, d) * torch.randn(1, d)
    spread = torch.randn(4096, d)
    assert feature_monitors(constant)["feature_std"].item() == pytest.approx(0.0, abs=1e-6)
    assert feature_monitors(spread)["feature_std"].item() == pytest.approx(1 / math.sqrt(d), rel=0.02)
    record = {"step": 9, "feature_std": 0.001}
    assert "looks collapsed: feature_std 0.0010" in collapse_warning(record, d)
    assert collapse_warning({"step": 9, "feature_std": 0.1}, d) is None


def test_teacher_monitors_tell_uniform_and_dominant_collapse():
    k = 32
    uniform = teacher_monitors(torch.zeros(8, k), torch.zeros(1, 1, k), 0.04)
    assert uniform["teacher_entropy"].item() == pytest.approx(1.0)
    dominant = torch.zeros(8, k)
    dominant[:, 3] = 10.0
    collapsed = teacher_monitors(dominant, torch.zeros(1, 1, k), 0.04)
    assert collapsed["prototypes_used"].item() == 1 and collapsed["teacher_entropy"].item() < 0.01
    spread = teacher_monitors(torch.eye(k)[:8] * 10, torch.zeros(1, 1, k), 0.04)
    assert spread["prototypes_used"].item() == 8
    assert "one DINO prototype" in collapse_warning({"step": 1, "prototypes_used": 1.0}, 64)


def test_metrics_carry_the_monitors(tmp_path, tiny_recipe):
    cfg = load_config(tiny_recipe, ["objective.name=dino", "objective.bottleneck_dim=8"])
    run_dir = tmp_path / "run"
    create_run_dir(run_dir, cfg)
    pretrain(cfg, run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        assert 0 < r["feature_std"] < 1 and 0 <= r["teacher_entropy"] <= 1 and r["prototypes_used"] >= 1


@pytest.mark.parametrize(("objective", "expected"), [("dino", "teacher"), ("mocov3", "student")])
def test_export_and_eval_use_the_reference_encoder(tmp_path, tiny_recipe, objective, expected):
    import timm

    cfg = load_config(tiny_recipe, [f"objective.name={objective}", "objective.bottleneck_dim=8"])
    run_dir, out = tmp_path / "run", tmp_path / "backbone.safetensors"
    create_run_dir(run_dir, cfg)
    pretrain(cfg, run_dir)
    assert main(["export", str(run_dir), "-o", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["encoder"] == expected
    vit = timm.create_model(meta["arch"], **json.loads(meta["timm_kwargs"]))
    vit.load_state_dict(load_file(str(out)), strict=True)
    trained = load_file(str(run_dir / "checkpoints/step_6/model.safetensors"))
    prefix = {"teacher": OBJECTIVES[objective].teacher, "student": "backbone"}[expected]
    other = {"teacher": "backbone", "student": OBJECTIVES[objective].teacher}[expected]
    key = "blocks.0.attn.qkv.weight"
    assert torch.equal(vit.state_dict()[key], trained[f"{prefix}.{key}"])
    assert not torch.equal(vit.state_dict()[key], trained[f"{other}.{key}"])

    flipped = tmp_path / "flipped.safetensors"
    assert main(["export", str(run_dir), "-o", str(flipped), "--encoder", "student"]) == 0
    assert torch.equal(load_file(str(flipped))[key], trained[f"backbone.{key}"])
