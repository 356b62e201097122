from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from accelvit.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LUMA,
    ViewDraw,
    ViewSpec,
    crop_boxes,
    gaussian_blur,
    hue_matrix,
    make_views,
    render,
    saturation_matrix,
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
    boxes = crop_boxes(2000, 32, 24, (0.2, 0.6), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    x0, y0, x1, y1 = boxes.T
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 24).all() and (y1 <= 32).all()
    area = (x1 - x0) * (y1 - y0) / (32 * 24)
    assert area.min() > 0.17 and area.max() < 0.65  # rounding to whole pixels
    assert len(set(x0.tolist())) > 5  # positions vary per image


def test_views_are_a_function_of_the_generator_seed_and_differ_per_image():
    x = images().expand(8, -1, -1, -1).clone()
    x[:] = x[0]  # eight copies of one image
    spec = ViewSpec(size=12, solarize=0.5)
    a = make_views(x, [spec, spec], step_generator(0, 5, 0))
    b = make_views(x, [spec, spec], step_generator(0, 5, 0))
    c = make_views(x, [spec, spec], step_generator(0, 6, 0))
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
    torch.testing.assert_close(
        hue_matrix(torch.full((8,), 2 * math.pi)), torch.eye(3).expand(8, 3, 3), atol=1e-5, rtol=0
    )
    turned = hue_matrix(torch.full((8,), 1.0))
    torch.testing.assert_close(LUMA @ turned, LUMA.expand(8, 3), atol=1e-5, rtol=0)
    assert not torch.allclose(turned, torch.eye(3))


def test_each_image_of_a_batch_gets_torchvision_s_colour_gray_and_blur_with_its_own_parameters():
    """The batched view against torchvision's per-image functional transforms, image by image, with
    the factors drawn: brightness, contrast, saturation (clamped after each), grayscale, blur."""
    from torchvision.transforms.v2 import functional as TF

    n, size, radius = 6, 16, 3
    x = images(n, size).float()
    b, c, s = (
        torch.tensor([0.5, 1.6, 1.0, 1.2, 0.9, 1.0]),
        torch.tensor([1.4, 0.3, 1.0, 0.8, 1.1, 1.0]),
        torch.tensor([0.2, 1.7, 1.0, 0.0, 1.3, 1.0]),
    )
    gray, blur = torch.tensor([0, 1, 0, 0, 1, 0]).bool(), torch.tensor([1, 0, 0, 1, 1, 0]).bool()
    sigma = torch.tensor([0.5, 1.0, 1.5, 0.8, 0.9, 1.0])
    whole = torch.tensor([[0, 0, size, size]] * n).float()
    draw = ViewDraw(
        torch.tensor([[size, size]] * n),
        whole,
        torch.zeros(n).bool(),
        b,
        c,
        saturation_matrix(s),
        torch.eye(3).expand(n, 3, 3),
        gray,
        sigma,
        blur,
        torch.zeros(n).bool(),
    )
    ours = render(x, draw, size, radius)
    for i in range(n):
        ref = x[i] / 255
        ref = TF.adjust_saturation(
            TF.adjust_contrast(TF.adjust_brightness(ref, float(b[i])), float(c[i])), float(s[i])
        )
        if gray[i]:
            ref = TF.rgb_to_grayscale(ref, num_output_channels=3)
        if blur[i]:
            ref = TF.gaussian_blur(ref, [2 * radius + 1] * 2, [float(sigma[i])] * 2)
        ref = TF.normalize(ref, list(IMAGENET_MEAN), list(IMAGENET_STD))
        # torchvision's luma weighs red 0.2989 where PIL (and accelvit) weigh 0.299
        torch.testing.assert_close(ours[i], ref, atol=2e-3, rtol=0)


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


def test_crops_equal_grid_sample_on_an_affine_grid():
    """The two 1-D passes compute what `grid_sample` does on the box's affine grid (border padding)."""
    import torch.nn.functional as F

    from accelvit.augment import resized_crops

    g = torch.Generator().manual_seed(3)
    for height, width, size in ((30, 22, 16), (12, 14, 40)):  # shrinking and enlarging
        x = torch.rand(64, 3, height, width, generator=g)
        boxes = crop_boxes(64, height, width, (0.08, 1.0), (3 / 4, 4 / 3), g)
        flip = torch.rand(64, generator=g) < 0.5
        theta = torch.zeros(64, 2, 3)
        theta[:, 0, 0] = torch.where(flip, -1, 1) * (boxes[:, 2] - boxes[:, 0]) / width
        theta[:, 0, 2] = (boxes[:, 0] + boxes[:, 2]) / width - 1
        theta[:, 1, 1] = (boxes[:, 3] - boxes[:, 1]) / height
        theta[:, 1, 2] = (boxes[:, 1] + boxes[:, 3]) / height - 1
        grid = F.affine_grid(theta, [64, 3, size, size], align_corners=False)
        expected = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        torch.testing.assert_close(resized_crops(x, boxes, size, flip), expected, atol=1e-5, rtol=0)
