from __future__ import annotations

import pytest
import timm
import torch

from accelvit.budget import VitShape, tokens_per_view
from accelvit.compress import drop_tokens, forward_features, forward_tokens
from accelvit.setting import Setting


def tiny_vit(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    args = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    args.update(kwargs)
    return timm.create_model("vit_tiny_patch16_224", **args).eval()


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"global_pool": "avg"},
        {"reg_tokens": 2},
        {"no_embed_class": True, "reg_tokens": 1},
        {"class_token": False, "global_pool": "avg"},
    ],
)
def test_keep_1_base_patch_equals_plain_timm_exactly(kwargs):
    vit = tiny_vit(**kwargs)
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(forward_features(vit, images, Setting(1.0, 4)), vit(images))
        assert torch.equal(forward_tokens(vit, images), vit.forward_features(images))


@pytest.mark.parametrize("keep", [1.0, 0.75, 0.5, 0.3, 0.25, 0.01])
@pytest.mark.parametrize("patch", [4, 8, 16])
def test_token_counts(keep, patch):
    vit = tiny_vit()
    tokens = forward_tokens(vit, torch.randn(2, 3, 16, 16), Setting(keep, patch))
    expected = tokens_per_view(VitShape(image_size=16, embed_dim=32, depth=2), Setting(keep, patch))
    assert tokens.shape == (2, expected, 32)
    assert expected == 1 + max(1, round(keep * (16 // patch) ** 2))


def test_token_dropout_keeps_prefix_and_a_fresh_subset_per_image():
    torch.manual_seed(0)
    tokens = torch.arange(2 * 17, dtype=torch.float32).reshape(2, 17, 1).expand(2, 17, 4).clone()
    out = drop_tokens(tokens, 0.5, num_prefix=1)
    assert out.shape == (2, 9, 4)
    assert torch.equal(out[:, 0], tokens[:, 0])
    for b in range(2):
        kept = set(out[b, 1:, 0].tolist())
        assert len(kept) == 8 and kept <= set(tokens[b, 1:, 0].tolist())
    first, second = (set(out[b, 1:, 0].tolist()) for b in range(2))
    assert {v - 17 for v in second} != first  # images do not share one mask


def test_patch_scaling_trains_the_base_kernel_and_position_embedding():
    vit = tiny_vit().train()
    base_kernel = vit.patch_embed.proj.weight
    forward_features(vit, torch.randn(2, 3, 16, 16), Setting(0.5, 8)).square().sum().backward()
    assert base_kernel.shape == (32, 3, 4, 4)  # the module was not swapped
    assert base_kernel.grad is not None and base_kernel.grad.abs().sum() > 0
    assert vit.pos_embed.grad is not None and vit.pos_embed.grad.abs().sum() > 0


def test_patch_scaling_matches_timm_resampling_outside_training():
    # Our in-graph resampling must equal timm's own weight resampling of a copy of the model.
    from timm.layers import resample_patch_embed

    vit = tiny_vit()
    images = torch.randn(2, 3, 16, 16)
    copy = tiny_vit(patch_size=8)
    state = vit.state_dict()
    state["patch_embed.proj.weight"] = resample_patch_embed(state["patch_embed.proj.weight"], [8, 8])
    state["pos_embed"] = timm.layers.resample_abs_pos_embed(state["pos_embed"], [2, 2], [4, 4])
    copy.load_state_dict(state)
    with torch.no_grad():
        assert torch.allclose(forward_features(vit, images, Setting(1.0, 8)), copy(images), atol=1e-5)
