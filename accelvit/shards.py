"""Image shards: a folder of images decoded once, resized, and stored as JPEG bytes in MDS shards.

`accelvit prepare FOLDER -o SHARDS --max-side N` reads an image folder (class sub-folders, with or
without train/ and val/), shrinks each image so that its longer side is at most N pixels (the
largest training crop keeps its resolution as long as N is at least the crop's output size times
the widest crop's share of the side), re-encodes it as JPEG and writes SHARDS/train (and
SHARDS/val) in mosaicml-streaming's MDS format, with the label and the source path of each image.
Recipes read them with `data.dataset: shards`; training then reads a few kB of bytes per image and
decodes whole batches at once on the training device (`torchvision.io.decode_jpeg`), where the
views are drawn (`accelvit.augment`).

Why MDS: the data stream is a pure function of (seed, step), so any sample must be readable by
index. Measured on this machine's one core, 2,000 JPEGs of 100x120 read in a random order: MDS
14,000 to 30,000 reads/s; litdata's StreamingDataset 250/s (built for chunk-wise shuffling);
webdataset reads tar streams in order only. MDS also splits over nodes and resumes mid-epoch in
its own loader, which a user reading the shards elsewhere may want.
"""

from __future__ import annotations

import copy
import io
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from accelvit.config import ConfigError
from accelvit.images import BadImageError, open_rgb

COLUMNS = {"jpeg": "bytes", "label": "int", "path": "str"}
CLASSES = "classes.json"
SPLITS = ("train", "val")


def _streaming():
    try:
        import streaming
    except ImportError:
        raise ConfigError(
            "data.dataset: shards needs mosaicml-streaming: pip install 'accelvit[shards]'"
        ) from None
    return streaming


def shrink(image: Image.Image, max_side: int) -> Image.Image:
    """`image` with its longer side at most `max_side` pixels (never enlarged), aspect kept."""
    width, height = image.size
    scale = max_side / max(width, height)
    if scale >= 1:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.BICUBIC, reducing_gap=3.0)


def encode(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def prepare(folder: Path, out: Path, max_side: int, quality: int = 90) -> dict[str, int]:
    """Write the shards of `folder` to `out`; returns the number of images of each split.

    Every split is checked before anything is written, and the shards are written beside `out`
    and renamed into place once complete, so a failure leaves nothing. Unreadable images are
    skipped and counted (`{split}_skipped`); classes are the sub-folders in sorted order, numbered
    as torchvision's ImageFolder numbers them.
    """
    streaming = _streaming()
    splits = [s for s in SPLITS if (folder / s).is_dir()] or [""]
    classes = {}
    for split in splits:
        classes[split] = sorted(p.name for p in (folder / split).iterdir() if p.is_dir())
        if not classes[split]:
            raise ConfigError(f"prepare: '{folder / split}' has no class sub-folders")
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    counts: dict[str, int] = {}
    try:
        for split in splits:
            name = split or "train"
            counts.update(
                _write_split(streaming, folder, split, classes[split], tmp / name, max_side, quality)
            )
        if out.exists():
            out.rmdir()  # empty: checked by the caller
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return counts


def _write_split(
    streaming, folder: Path, split: str, classes: list[str], target: Path, max_side: int, quality: int
) -> dict[str, int]:
    name, written, skipped = split or "train", 0, 0
    with streaming.MDSWriter(out=str(target), columns=COLUMNS, size_limit="64mb") as writer:
        for label, cls in enumerate(classes):
            for path in sorted(p for p in (folder / split / cls).rglob("*") if p.is_file()):
                try:
                    image = shrink(open_rgb(str(path)), max_side)
                except BadImageError:
                    skipped += 1
                    continue
                writer.write(
                    {"jpeg": encode(image, quality), "label": label, "path": str(path.relative_to(folder))}
                )
                written += 1
    (target / CLASSES).write_text(json.dumps(classes))
    return {name: written, **({f"{name}_skipped": skipped} if skipped else {})}


class ShardImages(Dataset):
    """The images of one split of shards; items are (PIL RGB, label), or (JPEG bytes as a uint8
    tensor, label) with `encoded` (the device path: the training process decodes whole batches)."""

    def __init__(self, split: Path, encoded: bool = False):
        streaming = _streaming()
        self.split, self.encoded = split, encoded
        # its own shuffling, sampling and caching are not used: items are read by index, in the
        # order the run's sampler gives (a pure function of seed and step)
        self._data = streaming.StreamingDataset(local=str(split), batch_size=1, shuffle=False)
        self.classes = json.loads((split / CLASSES).read_text())

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, index: int) -> tuple[Image.Image | torch.Tensor, int]:
        item = self._data[index]
        if self.encoded:
            return torch.frombuffer(bytearray(item["jpeg"]), dtype=torch.uint8), int(item["label"])
        return Image.open(io.BytesIO(item["jpeg"])).convert("RGB"), int(item["label"])

    def path(self, index: int) -> str:
        return self._data[index]["path"]

    def as_encoded(self) -> ShardImages:
        """The same split with items as JPEG bytes (the loader of device-drawn views)."""
        twin = copy.copy(self)  # shares the open StreamingDataset
        twin.encoded = True
        return twin


def shard_split(cfg, train: bool) -> Dataset:
    """`data.dataset: shards`: the train (or val) split of `accelvit prepare`'s output in `data.root`."""
    root = Path(cfg.root)
    split = root / ("train" if train else "val")
    if not (split / "index.json").is_file():
        what = "train" if train else "val (evaluation needs one: prepare a folder with val/)"
        raise ConfigError(
            f"data.root = '{root}': no {what} shards there (`accelvit prepare FOLDER -o {root}`)"
        )
    return ShardImages(split)


def synthetic_folder(out: Path, count: int, size: tuple[int, int], classes: int = 10, seed: int = 0) -> Path:
    """A folder of `count` random JPEGs of `size` (width, height) in `classes` sub-folders: the
    benchmarks' stand-in for ImageNet-like files, made without a download."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = out / f"class{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        # smooth random images (upsampled noise): JPEG sizes near those of photographs
        small = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize(size, Image.BILINEAR).save(folder / f"{i:06d}.jpg", quality=90)
    return out
