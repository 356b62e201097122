"""Images per second of the two data paths, per core (or on one GPU), at the views of a 224 px ViT.

- `folder`: an image folder of JPEGs of ImageNet-like sizes, each decoded with PIL and turned into
  SimCLR's two views by lightly's per-image transforms (`data.augment: cpu`);
- `shards`: the same images after `accelvit prepare --max-side` (decoded once, shrunk, stored as
  JPEG in MDS shards); the loader only reads bytes, and each batch is decoded in one call and its
  views drawn at once (`data.augment: device`) on the device timed.

The synthetic folder (`--count` random smooth images of `--size`) is made by the script itself, so it
needs no download. Both paths run in the timing process (no loader workers) with `--threads`
threads: images per second per core on a CPU.

    python -m benchmarks.data_path                        # CPU, one thread (a few minutes)
    python -m benchmarks.data_path --device cuda --count 20000 --batch 256   # one GPU
    python -m benchmarks.data_path --smoke                # seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also run as `python benchmarks/NAME.py`
from accelvit.augment import batch_views  # noqa: E402
from accelvit.config import load_config  # noqa: E402
from accelvit.data import StepBatchSampler, build_loader, encoded_images, load_dataset  # noqa: E402
from accelvit.objectives import view_pipeline  # noqa: E402
from accelvit.shards import ShardImages, prepare, synthetic_folder  # noqa: E402
from benchmarks.common import RESULTS, synchronize, write_result  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=1024, help="images in the synthetic folder")
    p.add_argument("--size", default="400x350", help="width x height of its JPEGs")
    p.add_argument("--image-size", type=int, default=224, help="side of the views")
    p.add_argument("--max-side", type=int, default=320, help="accelvit prepare --max-side")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=8, help="batches timed per path and repeat")
    p.add_argument(
        "--repeats", type=int, default=5, help="timings of each path, alternated; the median counts"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=0, help="loader workers (0: per-core figures)")
    p.add_argument("--folder", help="an existing folder of images instead of the synthetic one")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("-o", "--output", default=None)
    return p.parse_args(argv)


def recipe(image_size: int, root: Path, dataset: str, augment: str, batch: int, workers: int):
    return load_config(
        None,
        [
            f"model.image_size={image_size}",
            "model.patch_size=16",
            f"data.dataset={dataset}",
            f"data.root={root}",
            f"data.augment={augment}",
            f"data.workers={workers}",
            f"train.batch_size={batch}",
            "objective.name=simclr",
        ],
        check_paths=False,
    )


def images_per_s(images, cfg, batches: int, device: torch.device) -> float:
    """Views of `batches` batches drawn as a training run draws them, timed after one warm-up batch."""
    transform, specs = view_pipeline(cfg)
    if specs is not None:
        images = encoded_images(images)
    sampler = StepBatchSampler(len(images), cfg.train.batch_size, 0, 0, batches + 1)
    loader = iter(build_loader(images, transform, cfg.data.workers, sampler, device.type == "cuda"))
    start = None
    for step in range(batches + 1):
        if step == 1:  # the first batch warms caches and kernels
            synchronize()
            start = time.perf_counter()
        loaded, _, _ = next(loader)
        views = batch_views(loaded, specs, 0, step, 0, device)
        assert views[0].shape[-1] == cfg.model.image_size
    synchronize()
    return batches * cfg.train.batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.smoke:
        args.count, args.size, args.image_size, args.max_side, args.batch, args.batches = (
            24,
            "60x50",
            32,
            40,
            8,
            2,
        )
        args.repeats = 1
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return measure(args)
    finally:
        torch.set_num_threads(threads)  # called from tests: the next test's numerics must not change


def measure(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    width, height = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = (
            Path(args.folder)
            if args.folder
            else synthetic_folder(Path(tmp) / "folder", args.count, (width, height))
        )
        started = time.perf_counter()
        prepare(folder, Path(tmp) / "shards", args.max_side)
        prepare_s = time.perf_counter() - started
        shards = ShardImages(Path(tmp) / "shards/train")
        jpeg_bytes = sum(len(shards.as_encoded()[i][0]) for i in range(len(shards))) / len(shards)
        common = (args.batch, args.workers)
        folder_cfg = recipe(args.image_size, folder, "imagefolder", "cpu", *common)
        shards_cfg = recipe(args.image_size, Path(tmp) / "shards", "shards", "device", *common)
        folder_rates, shards_rates = [], []
        for _ in range(args.repeats):  # alternated, so a slow spell of the machine hits both paths
            folder_rates.append(
                images_per_s(load_dataset(folder_cfg.data), folder_cfg, args.batches, torch.device("cpu"))
            )
            shards_rates.append(images_per_s(load_dataset(shards_cfg.data), shards_cfg, args.batches, device))
        folder_rate, shards_rate = statistics.median(folder_rates), statistics.median(shards_rates)
    per = "core" if device.type == "cpu" and args.workers == 0 else "process"
    result = {
        "images": args.count,
        "source_size": args.size,
        "image_size": args.image_size,
        "max_side": args.max_side,
        "batch": args.batch,
        "threads": args.threads,
        "workers": args.workers,
        "views_device": device.type,
        "per": per,
        "prepare_images_per_s": args.count / prepare_s,
        "shard_bytes_per_image": jpeg_bytes,
        "repeats": args.repeats,
        "folder_images_per_s": folder_rate,
        "shards_images_per_s": shards_rate,
        "folder_images_per_s_each": folder_rates,
        "shards_images_per_s_each": shards_rates,
        "shards_over_folder": shards_rate / folder_rate,
    }
    print(
        f"medians of {args.repeats}: folder, per-image transforms: {folder_rate:.0f} images/s; "
        f"shards, batched views on {device.type}: "
        f"{shards_rate:.0f} images/s ({shards_rate / folder_rate:.2f}x), {jpeg_bytes / 1024:.1f} kB an image"
    )
    name = "data_path" + ("-smoke" if args.smoke else "")
    return write_result(name, result, args.output or str(RESULTS / f"{name}-{device.type}.json"))


if __name__ == "__main__":
    main()
