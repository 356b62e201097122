from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from accelvit.arch import precondition_tokens, run_blocks
from accelvit.backbone import build_backbone, vit_shape
from accelvit.budget import VitShape, forward_flops
from accelvit.cli import main
from accelvit.compress import base_patch_size, forward_tokens, vit_stem_stride
from accelvit.config import ConfigError, ModelConfig, RampConfig, ScheduleConfig, patch_sizes
from accelvit.diagnostics import condition_numbers, measure_blocks
from accelvit.schedule import setting_at
from accelvit.setting import Setting, allowed_patch_sizes, patch_for_size

TINY = ModelConfig(
    arch="vit_tiny_patch16_224", image_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2
)


def pair(**options) -> tuple:
    """A plain tiny ViT and one with `options`, holding the same weights."""
    torch.manual_seed(0)
    plain = build_backbone(TINY)
    other = build_backbone(dataclasses.replace(TINY, **options))
    missing, unexpected = other.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"value_lambdas"}
    return plain.eval(), other.eval()


def test_value_residual_with_fixed_one_zero_is_the_plain_vit_exactly():
    plain, vr = pair(value_residual=True, value_lambdas=[1.0, 0.0])
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(forward_tokens(vr, x), forward_tokens(plain, x))
    torch.manual_seed(1)
    dropped = forward_tokens(plain, x, Setting(0.5, 8))
    torch.manual_seed(1)  # the same token subsets
    assert torch.equal(forward_tokens(vr, x, Setting(0.5, 8)), dropped)
    assert "value_lambdas" not in dict(vr.named_parameters())  # fixed: a buffer


def test_learnable_value_residual_mixes_first_block_values_and_learns_its_scalars():
    plain, vr = pair(value_residual=True)
    assert torch.equal(vr.value_lambdas, torch.full((3, 2), 0.5))
    x = torch.randn(2, 3, 16, 16)
    out = forward_tokens(vr, x)
    assert not torch.allclose(out, forward_tokens(plain, x))
    out.square().mean().backward()
    assert vr.value_lambdas.grad is not None
    assert vr.value_lambdas.grad[1:].abs().sum() > 0  # blocks after the first use V_1
    assert torch.equal(vr.value_lambdas.grad[0], torch.zeros(2))  # the first block has no V_1 yet


def test_no_attention_skip_is_attention_then_mlp_with_its_skip():
    plain, no_skip = pair(attn_skip=False)
    x = torch.randn(2, 17, 32)
    expected = x
    for block in plain.blocks:
        attn = block.ls1(block.attn(block.norm1(expected)))
        expected = attn + block.ls2(block.mlp(block.norm2(attn)))
    torch.testing.assert_close(run_blocks(no_skip, x), expected)
    # accelvit's own block forward (taken whenever an observer is given) is timm's
    torch.testing.assert_close(run_blocks(plain, x, observe=lambda i, t: None), plain.blocks(x))


def test_svd_preconditioning_raises_the_condition_number_to_the_power_alpha():
    tokens = torch.randn(3, 1 + 16, 32)
    tokens[:, 1:] *= torch.logspace(0, 2, 32)  # badly conditioned patch tokens
    out = precondition_tokens(tokens, num_prefix=1, alpha=0.5)
    assert torch.equal(out[:, :1], tokens[:, :1])  # the class token is left alone
    before, after = condition_numbers(tokens[:, 1:]), condition_numbers(out[:, 1:])
    torch.testing.assert_close(after, before.sqrt(), rtol=1e-3, atol=0)
    torch.testing.assert_close(precondition_tokens(tokens, 1, 1.0), tokens, rtol=1e-4, atol=1e-4)
    # the largest singular value is kept
    top = torch.linalg.svdvals(out[:, 1:].double())[:, 0]
    torch.testing.assert_close(top, torch.linalg.svdvals(tokens[:, 1:].double())[:, 0], rtol=1e-4, atol=0)


def test_diagnostics_show_the_lower_input_condition_number():
    plain, pre = pair(token_precondition="svd", precondition_alpha=0.5)
    x = torch.randn(4, 3, 16, 16)
    a, b = measure_blocks(plain, x)[0]["input_cond"], measure_blocks(pre, x)[0]["input_cond"]
    assert b == pytest.approx(a**0.5, rel=0.05)


def export_run(tmp_path, recipe, option: str) -> tuple[list[str], torch.nn.Module]:
    """Train a tiny run with `option`, export it, and load the file strictly into a rebuilt backbone.

    Returns the metadata's extra parameters and the loaded backbone."""
    run_dir, out = tmp_path / "run", tmp_path / "backbone.safetensors"
    assert main(["pretrain", str(recipe), "-o", str(run_dir), "--set", option]) == 0
    assert main(["export", str(run_dir), "-o", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    vit = build_backbone(ModelConfig(**json.loads(meta["accelvit_model"])))
    vit.load_state_dict(load_file(str(out)))  # strict
    return json.loads(meta["extra_parameters"]), vit


def test_options_export_with_their_extra_parameters_and_load_back(tmp_path, tiny_recipe):
    extra, vit = export_run(tmp_path, tiny_recipe, "model.value_residual=true")
    assert extra == ["value_lambdas"]
    trained = vit.value_lambdas.detach()
    assert not torch.equal(trained, torch.full_like(trained, 0.5))  # the scalars were trained


# Convolutional stem (model.stem)


def stem_vit(**changes):
    torch.manual_seed(0)
    return build_backbone(dataclasses.replace(TINY, stem=[8, 16], **changes)).eval()


def test_stem_base_setting_is_timms_hybrid_forward_exactly():
    vit = stem_vit()
    images = torch.randn(3, 3, 16, 16)
    assert (base_patch_size(vit), vit_stem_stride(vit)) == (4, 4)
    assert vit.patch_embed.proj.weight.shape == (32, 16, 1, 1)  # one cell of the stem's 4x4 map
    with torch.no_grad():
        assert torch.equal(forward_tokens(vit, images), vit.forward_features(images))
        assert forward_tokens(vit, images, Setting(0.5, 8)).shape == (3, 1 + 2, 32)


def test_stem_patch_scaling_resamples_the_projection_like_timm():
    from timm.layers import resample_abs_pos_embed, resample_patch_embed

    vit = stem_vit()
    copy = stem_vit(patch_size=8)  # the same stem, a projection over 2x2 cells
    state = vit.state_dict()
    state["patch_embed.proj.weight"] = resample_patch_embed(state["patch_embed.proj.weight"], [2, 2])
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], [2, 2], [4, 4])
    copy.load_state_dict(state)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            forward_tokens(vit, images, Setting(1.0, 8)), copy.forward_features(images)
        )


def test_stem_and_base_projection_get_the_gradient_of_a_scaled_patch():
    vit = stem_vit().train()
    forward_tokens(vit, torch.randn(4, 3, 16, 16), Setting(0.5, 8)).square().sum().backward()
    for name in (
        "patch_embed.backbone.0.conv.weight",
        "patch_embed.backbone.1.conv.weight",
        "patch_embed.proj.weight",
    ):
        grad = vit.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_timms_hybrid_archs_are_refused_for_model_stem():
    with pytest.raises(ConfigError, match="a hybrid CNN-ViT; use a plain ViT with model.stem"):
        build_backbone(ModelConfig(arch="vit_tiny_r_s16_p8_224", image_size=32, patch_size=4))


def test_stem_restricts_patch_sizes_to_multiples_of_its_stride():
    assert allowed_patch_sizes(28, 4) == [4, 7, 14, 28]
    assert allowed_patch_sizes(28, 4, stride=2) == [4, 14, 28]
    assert patch_sizes(ModelConfig(image_size=28, patch_size=4, stem=[8, 8])) == [4, 28]
    assert patch_for_size(8, 12, 4) == 6  # a DINO local crop of 12 px
    assert patch_for_size(8, 12, 4, stride=4) == 4  # ties go to the smaller size
    schedule = ScheduleConfig(patch=RampConfig(start=20))
    assert setting_at(schedule, 0.0, 28, 4).patch == 14
    assert setting_at(schedule, 0.0, 28, 4, stride=4).patch == 28


def test_stem_flops_on_a_hand_count():
    shape = VitShape(image_size=8, embed_dim=2, depth=1, mlp_ratio=4, in_chans=1, stem=(3,))
    # stem 2*(4*4)*9*1*3 = 864; 4 patches of 2x2 stem cells: embed 2*4*3*4*2 = 192; block 680
    assert forward_flops(shape, Setting(1.0, 4)) == 864 + 192 + 680
    assert vit_shape(stem_vit(), 16) == VitShape(16, 32, 3, in_chans=3, stem=(8, 16), num_heads=2)


def test_stem_run_exports_its_layers_and_loads_back(tmp_path, tiny_recipe):
    extra, vit = export_run(tmp_path, tiny_recipe, "model.stem=[8]")
    assert "patch_embed.backbone.0.conv.weight" in extra and "patch_embed.backbone.0.bn.running_mean" in extra
    assert vit.patch_embed.backbone[0].bn.num_batches_tracked > 0  # its batch norm saw the training
