"""Shards (`accelvit prepare`, `data.dataset: shards`) and views drawn from JPEG bytes decoded in
batches: the parameter distributions against torchvision's per-image transforms, per-image crops,
determinism in (seed, step), and resumes that read exactly the images an uninterrupted run reads."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("streaming", reason="mosaicml-streaming is the shards' format (pip install -e '.[dev]')")

from accelvit.augment import ViewSpec, batch_views, crop_boxes, decode_batch, make_views  # noqa: E402
from accelvit.checkpoint import create_run_dir  # noqa: E402
from accelvit.cli import main  # noqa: E402
from accelvit.config import load_config  # noqa: E402
from accelvit.data import StepBatchSampler, build_loader, encoded_images, load_dataset  # noqa: E402
from accelvit.objectives import view_pipeline  # noqa: E402
from accelvit.shards import ShardImages, synthetic_folder  # noqa: E402
from accelvit.train import pretrain  # noqa: E402
from tests.conftest import TINY, write_recipe  # noqa: E402


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """30 train and 12 val JPEGs of two sizes (so batches mix sizes), prepared into shards."""
    root = tmp_path_factory.mktemp("shards")
    synthetic_folder(root / "folder/train", 20, (48, 36), classes=3)
    synthetic_folder(root / "folder/train", 10, (30, 40), classes=3, seed=1)  # the same names: replaced
    synthetic_folder(root / "folder/val", 12, (40, 40), classes=3, seed=2)
    for i in range(20, 30):  # ten more of another size
        Image.new("RGB", (30, 44), (i * 8, 100, 50)).save(root / f"folder/train/class{i % 3:03d}/x{i}.jpg")
    assert main(["prepare", str(root / "folder"), "-o", str(root / "shards"), "--max-side", "40"]) == 0
    return root / "shards"


def shard_recipe(tmp_path: Path, shards: Path, **train) -> Path:
    data = {**TINY, "data": {"dataset": "shards", "root": str(shards), "workers": 2, "augment": "device"}}
    data["eval"] = {"train_limit": 20, "test_limit": 12}
    data["train"] = {**TINY["train"], **train}
    return write_recipe(tmp_path / "shards.yaml", data)


def test_prepare_keeps_labels_and_paths_and_shrinks_to_max_side(shards):
    train = ShardImages(shards / "train")
    assert len(train) == 30 and len(ShardImages(shards / "val")) == 12
    assert train.classes == ["class000", "class001", "class002"]
    for i in range(len(train)):
        image, label = train[i]
        assert max(image.size) <= 40 and train.path(i).startswith(f"train/class00{label}/")
    sizes = {train[i][0].size for i in range(len(train))}
    assert (40, 30) in sizes and (27, 40) in sizes  # 48x36 and 30x44 shrunk, aspect kept


def test_prepare_refuses_bad_input_and_writes_nothing(tmp_path, shards, capsys):
    capsys.readouterr()
    assert main(["prepare", str(tmp_path / "nowhere"), "-o", str(tmp_path / "out")]) == 2
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat/a.jpg").write_bytes(b"")
    assert main(["prepare", str(tmp_path / "flat"), "-o", str(tmp_path / "out")]) == 2
    assert main(["prepare", str(tmp_path / "flat"), "-o", str(shards), "--max-side", "32"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and "has no class sub-folders" in err[1] and "not an empty folder" in err[2]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))


def test_batched_decode_equals_per_image_decode(shards):
    pil, encoded = ShardImages(shards / "train"), ShardImages(shards / "train").as_encoded()
    decoded = decode_batch([encoded[i][0] for i in range(8)], torch.device("cpu"))
    for i, image in enumerate(decoded):
        reference = torch.from_numpy(np.array(pil[i][0])).permute(2, 0, 1)
        assert image.shape == reference.shape
        assert (image.int() - reference.int()).abs().max() <= 1  # libjpeg-turbo both; IDCT rounding


def test_crops_follow_torchvision_random_resized_crop_per_image_size():
    """Crop area and aspect of per-image sizes against torchvision's own `get_params`, per image:
    two-sample Kolmogorov-Smirnov distance below its 0.1% critical value."""
    from torchvision.transforms import RandomResizedCrop

    n, scale, ratio = 4000, (0.08, 1.0), (3 / 4, 4 / 3)
    heights = torch.tensor([300, 400] * (n // 2))
    widths = torch.tensor([500, 350] * (n // 2))
    boxes = crop_boxes(n, heights, widths, scale, ratio, torch.Generator().manual_seed(0))
    x0, y0, x1, y1 = boxes.T
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= widths).all() and (y1 <= heights).all()
    torch.manual_seed(0)
    ref = [
        RandomResizedCrop.get_params(torch.empty(3, int(h), int(w)), scale, ratio)
        for h, w in zip(heights, widths, strict=True)
    ]
    ref_area = torch.tensor([h * w for _, _, h, w in ref]) / (heights * widths)
    ref_aspect = torch.tensor([math.log(w / h) for _, _, h, w in ref])
    area = (x1 - x0) * (y1 - y0) / (heights * widths)
    aspect = torch.log((x1 - x0) / (y1 - y0))
    critical = 1.95 * math.sqrt(2 / n)  # alpha 0.001
    for ours, theirs in ((area, ref_area), (aspect, ref_aspect)):
        grid = torch.cat([ours, theirs]).float().sort().values
        cdf_ours = torch.searchsorted(ours.float().sort().values, grid, right=True) / n
        cdf_theirs = torch.searchsorted(theirs.float().sort().values, grid, right=True) / n
        assert (cdf_ours - cdf_theirs).abs().max() < critical


def test_flip_and_jitter_rates_and_ranges():
    n = 4000
    x = torch.full((n, 3, 8, 8), 128, dtype=torch.uint8)
    x[:, :, :, :4] = 32  # left half dark: a flip moves it
    flip_only = ViewSpec(size=8, scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter=0.0, gray=0.0, blur=0.0)
    (v,) = make_views(x, [flip_only], torch.Generator().manual_seed(0))
    flipped = (v[:, 0, 0, 0] > v[:, 0, 0, -1]).float().mean()
    assert abs(flipped - 0.5) < 4 * math.sqrt(0.25 / n)
    brightness = ViewSpec(size=8, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, jitter=1.0, contrast=0.0,
                          saturation=0.0, hue=0.0, gray=0.0, blur=0.0, brightness=0.4)  # fmt: skip
    x = torch.full((n, 3, 8, 8), 100, dtype=torch.uint8)
    (v,) = make_views(x, [brightness], torch.Generator().manual_seed(1))
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    factor = ((v * std + mean)[:, 0, 0, 0] * 255 / 100).double()
    assert factor.min() >= 0.6 - 1e-3 and factor.max() <= 1.4 + 1e-3  # ColorJitter(brightness=0.4)
    assert abs(factor.mean() - 1.0) < 4 * 0.8 / math.sqrt(12 * n)  # uniform on [0.6, 1.4]


def test_every_image_of_a_padded_batch_gets_its_own_crop_inside_itself():
    small = torch.full((3, 10, 12), 200, dtype=torch.uint8)
    large = torch.full((3, 30, 20), 50, dtype=torch.uint8)
    spec = ViewSpec(size=6, hflip=0.0, jitter=0.0, gray=0.0, blur=0.0)
    (v,) = make_views([small, large] * 8, [spec], torch.Generator().manual_seed(0))
    values = (v[:, 0] * 0.229 + 0.485) * 255  # channel 0 back to pixels
    assert torch.allclose(values[0::2], torch.full_like(values[0::2], 200.0), atol=0.5)  # never the padding
    assert torch.allclose(values[1::2], torch.full_like(values[1::2], 50.0), atol=0.5)
    boxes = crop_boxes(
        16,
        torch.tensor([10, 30] * 8),
        torch.tensor([12, 20] * 8),
        (0.08, 1.0),
        (3 / 4, 4 / 3),
        torch.Generator().manual_seed(0),
    )
    assert len({tuple(b) for b in boxes.tolist()}) == 16


def test_views_from_shards_are_a_function_of_seed_and_step(shards):
    cfg = load_config(
        write_recipe(
            Path(shards.parent / "v.yaml"),
            {**TINY, "data": {"dataset": "shards", "root": str(shards), "augment": "device"}},
        )
    )
    transform, specs = view_pipeline(cfg)
    images = encoded_images(load_dataset(cfg.data))

    def step_views(step: int, workers: int) -> list[torch.Tensor]:
        sampler = StepBatchSampler(len(images), 8, 0, step, step + 1)
        loaded, _, _ = next(iter(build_loader(images, transform, workers, sampler)))
        return batch_views(loaded, specs, 0, step, 0, torch.device("cpu"))

    a, b, c = step_views(3, 0), step_views(3, 2), step_views(4, 0)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("world", [1, 2])
def test_a_resumed_epoch_reads_each_shard_image_once(shards, world):
    """Steps 0..k and k.. of an epoch (k a resume point), all processes together: every image once."""
    images = encoded_images(
        load_dataset(
            load_config(
                write_recipe(
                    shards.parent / "e.yaml", {**TINY, "data": {"dataset": "shards", "root": str(shards)}}
                )
            ).data
        )
    )
    steps = len(images) // (5 * world)  # global batch 5 x world: one epoch of 30 images
    assert steps * 5 * world == len(images)
    read = []
    for start, end in ((0, 2), (2, steps)):  # stopped after step 2, resumed there
        for rank in range(world):
            sampler = StepBatchSampler(len(images), 5, 0, start, end, rank, world)
            for keys in sampler:
                read += [bytes(images[i][0].numpy()) for i, _ in keys]
    everything = sorted(bytes(images[i][0].numpy()) for i in range(len(images)))
    assert len(set(everything)) == len(images) and sorted(read) == everything


def test_a_shards_run_with_workers_resumes_bit_exactly(tmp_path, shards):
    recipe = shard_recipe(tmp_path, shards)
    cfg = load_config(recipe)
    run_dir = tmp_path / "run"
    create_run_dir(run_dir, cfg)
    pretrain(cfg, run_dir)
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    weights = (run_dir / "checkpoints/step_6/model.safetensors").read_bytes()
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    shutil.rmtree(run_dir / "checkpoints/step_6")
    pretrain(cfg, run_dir, resume=True)
    resumed = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert resumed == losses and (run_dir / "checkpoints/step_6/model.safetensors").read_bytes() == weights
