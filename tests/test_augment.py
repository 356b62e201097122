from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from accelvit.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ViewSpec,
    crop_boxes,
    gaussian_blur,
    make_views,
    rotate_hue,
    step_generator,
)
from accelvit.checkpoint import create_run_dir
from accelvit.config import load_config
from accelvit.objectives import OBJECTIVES
from accelvit.train import pretrain

PLAIN = ViewSpec(size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, jitter=0.0, gray=0.0, blur=0.0)


def images(n: int = 8, size: int = 16) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )


def normalised(x: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return (x.float() / 255 - mean) / std


def test_whole_image_crop_without_colour_is_the_normalised_image():
    x = images()
    (view,) = make_views(x, [PLAIN], torch.Generator().manual_seed(1))
    torch.testing.assert_close(view, normalised(x), atol=1e-5, rtol=0)
    (flipped,) = make_views(x, [PLAIN.__class__(**{**PLAIN.__dict__, "hflip": 1.0})], torch.Generator())
    torch.testing.assert_close(flipped, normalised(x).flip(-1), atol=1e-5, rtol=0)


def test_crop_boxes_lie_inside_and_cover_the_asked_area():
    boxes = crop_boxes(2000, 32, 24, (0.2, 0.6), (3 / 4, 4 / 3), torch.Generator().manual_seed(0), "cpu")
    x0, y0, x1, y1 = boxes.T
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 24).all() and (y1 <= 32).all()
    area = (x1 - x0) * (y1 - y0) / (32 * 24)
    assert area.min() > 0.17 and area.max() < 0.65  # rounding to whole pixels
    assert len(set(x0.tolist())) > 5  # positions vary per image


def test_views_are_a_function_of_the_generator_seed_and_differ_per_image():
    x = images().expand(8, -1, -1, -1).clone()
    x[:] = x[0]  # eight copies of one image
    spec = ViewSpec(size=12, solarize=0.5)
    a = make_views(x, [spec, spec], step_generator(0, 5, 0, torch.device("cpu")))
    b = make_views(x, [spec, spec], step_generator(0, 5, 0, torch.device("cpu")))
    c = make_views(x, [spec, spec], step_generator(0, 6, 0, torch.device("cpu")))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (8, 3, 12, 12)
    assert len({tuple(v.flatten()[:20].tolist()) for v in a[0]}) == 8  # same image, 8 different views


def test_grayscale_blur_and_hue_behave():
    x = images()
    (gray,) = make_views(x, [PLAIN.__class__(**{**PLAIN.__dict__, "gray": 1.0})], torch.Generator())
    raw = gray * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
    torch.testing.assert_close(raw[:, 0], raw[:, 1], atol=1e-5, rtol=0)
    # blur keeps a constant image and the mean of any image (reflect padding aside), and smooths noise
    flat = torch.full((2, 3, 16, 16), 0.3)
    torch.testing.assert_close(gaussian_blur(flat, torch.tensor([0.5, 2.0])), flat)
    noise = x.float() / 255
    assert gaussian_blur(noise, torch.full((8,), 1.5)).std() < 0.5 * noise.std()
    # a hue rotation by 2 pi is the identity; by any angle it keeps luma
    torch.testing.assert_close(rotate_hue(noise, torch.full((8,), 2 * math.pi)), noise, atol=1e-5, rtol=0)
    turned = rotate_hue(noise, torch.full((8,), 1.0))
    luma = torch.tensor([0.299, 0.587, 0.114])[None, :, None, None]
    torch.testing.assert_close((turned * luma).sum(1), (noise * luma).sum(1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["simclr", "mocov3", "dino"])
def test_view_specs_match_the_cpu_transforms_views(name, tiny_config):
    cfg = tiny_config
    cfg.objective.local_crops = 2 if name == "dino" else 0
    objective = OBJECTIVES[name]
    specs = objective.view_specs(cfg.objective, cfg.model, cfg.data)
    from PIL import Image

    cpu_views = objective.transform(cfg.objective, cfg.model, cfg.data)(Image.new("RGB", (16, 16)))
    assert [s.size for s in specs] == [v.shape[-1] for v in cpu_views]


@pytest.mark.parametrize("augment", ["cpu", "device"])
def test_data_views_picks_the_named_view_pair(augment, tiny_recipe):
    """SimCLR with data.views: byol draws MoCo-v3's (BYOL's) asymmetric pair; the default its own."""
    from accelvit.augment import ViewSpec
    from accelvit.objectives import view_pipeline

    byol = view_pipeline(load_config(tiny_recipe, [f"data.augment={augment}", "objective.name=mocov3"]))
    own = view_pipeline(load_config(tiny_recipe, [f"data.augment={augment}"]))
    chosen = view_pipeline(load_config(tiny_recipe, [f"data.augment={augment}", "data.views=byol"]))
    if augment == "device":
        assert chosen[1] == byol[1] != own[1]
        assert [(s.blur, s.solarize) for s in chosen[1]] == [(1.0, 0.0), (0.1, 0.2)]
        assert own[1] == [ViewSpec(size=16, scale=(own[1][0].scale[0], 1.0))] * 2
    else:
        assert type(chosen[0]) is type(byol[0]) is not type(own[0])
        assert type(chosen[0]).__name__ == "BYOLTransform"


def test_device_augmented_run_resumes_bit_exactly(tmp_path, tiny_recipe):
    cfg = load_config(tiny_recipe, ["data.augment=device"])
    run_dir = tmp_path / "run"
    create_run_dir(run_dir, cfg)
    pretrain(cfg, run_dir)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in lines]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    shutil.rmtree(run_dir / "checkpoints/step_6")
    pretrain(cfg, run_dir, resume=True)
    assert [
        json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ] == losses
