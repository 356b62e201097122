from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from accelvit.arch import precondition_tokens, run_blocks
from accelvit.backbone import build_backbone
from accelvit.cli import main
from accelvit.compress import forward_tokens
from accelvit.config import ModelConfig
from accelvit.diagnostics import condition_numbers, measure_blocks
from accelvit.schedule import Setting

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


def test_options_export_with_their_extra_parameters_and_load_back(tmp_path, tiny_recipe):
    run_dir = tmp_path / "run"
    assert main(["pretrain", str(tiny_recipe), "-o", str(run_dir), "--set", "model.value_residual=true"]) == 0
    out = tmp_path / "backbone.safetensors"
    assert main(["export", str(run_dir), "-o", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["extra_parameters"]) == ["value_lambdas"]
    model = ModelConfig(**json.loads(meta["accelvit_model"]))
    vit = build_backbone(model)
    vit.load_state_dict(load_file(str(out)))  # strict
    trained = load_file(str(out))["value_lambdas"]
    assert not torch.equal(trained, torch.full_like(trained, 0.5))  # the scalars were trained
