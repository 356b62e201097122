"""Datasets and view loaders.

The data stream is a pure function of (seed, step): step s of a run with global batch G reads
positions s*G .. (s+1)*G-1 of an endless sequence of per-epoch permutations, and each sample's
augmentations are drawn from an RNG seeded by (seed, position). So a resumed run, a run with more
workers, or a run split over more processes (same global batch) sees exactly the same views.
"""

from __future__ import annotations

import contextlib
import gzip
import itertools
import os
import random
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from accelvit.config import ConfigError, DataConfig
from accelvit.images import BadImageError, open_rgb
from accelvit.shards import shard_split

FASHION_MNIST_CLASSES = 10


class ArrayImages(Dataset):
    """Images held in memory as a uint8 array (N, H, W) or (N, H, W, 3); items are (PIL RGB, label)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]).convert("RGB"), int(self.labels[index])


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (the MNIST format), gzipped or plain."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ConfigError(f"{path}: not an unsigned-byte idx file")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find_idx(root: Path, stem: str) -> Path:
    for folder in (root, root / "FashionMNIST" / "raw"):
        for name in (f"{stem}.gz", stem):
            if (folder / name).is_file():
                return folder / name
    raise ConfigError(f"data.root = '{root}': no {stem}[.gz] there (fashion-mnist idx files)")


def fashion_mnist(cfg: DataConfig, train: bool) -> Dataset:
    root = Path(cfg.root)
    if cfg.download:
        from torchvision.datasets import FashionMNIST

        ds = FashionMNIST(str(root), train=train, download=True)
        return ArrayImages(ds.data.numpy(), ds.targets.numpy())
    split = "train" if train else "t10k"
    images = read_idx(_find_idx(root, f"{split}-images-idx3-ubyte"))
    labels = read_idx(_find_idx(root, f"{split}-labels-idx1-ubyte"))
    return ArrayImages(images, labels)


def cifar10(cfg: DataConfig, train: bool) -> Dataset:
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(cfg.root, train=train, download=cfg.download)
    except RuntimeError as exc:
        raise ConfigError(f"data.root = '{cfg.root}': {exc}") from None
    return ArrayImages(ds.data, np.asarray(ds.targets))


def image_folder(cfg: DataConfig, train: bool) -> Dataset:
    from torchvision.datasets import ImageFolder

    root = Path(cfg.root)
    split = root / ("train" if train else "val")
    folder = split if split.is_dir() else root
    if not train and folder == root:
        raise ConfigError(f"data.root = '{root}': evaluation needs a val/ folder beside train/")
    try:
        return ImageFolder(str(folder), loader=open_rgb)
    except (FileNotFoundError, RuntimeError) as exc:
        raise ConfigError(f"data.root = '{folder}': {exc}") from None


def synthetic(cfg: DataConfig, train: bool, size: int = 32) -> Dataset:
    """Ten classes of oriented colour stripes with noise; deterministic per index. Tests only."""
    count = cfg.limit or 512
    offset = 0 if train else 1_000_000
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    labels = np.arange(count) % 10
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        rng = np.random.default_rng(offset + i)
        angle = labels[i] * np.pi / 10
        wave = np.sin(2 * np.pi * (3 + labels[i] % 3) * (np.cos(angle) * xx + np.sin(angle) * yy))
        colour = np.array([(labels[i] * 37) % 255, (labels[i] * 91) % 255, 128])
        img = 128 + 100 * wave[..., None] * colour / 255 + rng.normal(0, 20, (size, size, 3))
        images[i] = np.clip(img, 0, 255).astype(np.uint8)
    return ArrayImages(images, labels)


DATASETS: dict[str, Callable[[DataConfig, bool], Dataset]] = {
    "fashion-mnist": fashion_mnist,
    "cifar10": cifar10,
    "imagefolder": image_folder,
    "shards": shard_split,
    "synthetic": synthetic,
}


def load_dataset(cfg: DataConfig, train: bool = True, limited: bool = True) -> Dataset:
    """The labelled train (or test) split named by `data.dataset`; items are (PIL RGB, label).

    `data.limit` shortens the train split used for pretraining (`limited=False`: the whole split).
    """
    ds = DATASETS[cfg.dataset](cfg, train)
    if len(ds) == 0:
        raise ConfigError(f"data.root = '{cfg.root}': the dataset is empty")
    if train and limited and cfg.limit is not None and cfg.limit < len(ds):
        ds = Subset(ds, range(cfg.limit))
    _check_readable(ds)
    return ds


def _check_readable(ds: Dataset) -> None:
    """Refuse, before a run starts, a dataset of which no image decodes (one decode when the first
    does; unreadable ones among readable are the loop's to skip, `data.on_bad_file`)."""
    first = ""
    for index in range(len(ds)):
        try:
            ds[index]
            return
        except BadImageError as exc:
            first = first or str(exc)
    raise BadImageError(f"no image of the dataset can be read (first: {first})")


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with python, numpy and torch (CPU) RNGs seeded.

    In the training process (no loader workers) their states are restored afterwards, since token
    dropout draws from them; a worker process has nothing to restore. Seeding only the CPU generator
    (not `torch.manual_seed`, which also seeds every GPU) keeps this at a few microseconds a sample.
    """
    in_worker = torch.utils.data.get_worker_info() is not None
    states = None if in_worker else (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
    random.seed(seed)
    np.random.seed(seed)
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        if states is not None:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.random.set_rng_state(states[2])


class ViewDataset(Dataset):
    """Turns (index, sample_seed) keys into (views, label, bad), augmentations seeded per sample.

    An unreadable image is replaced by the next readable one (so the stream stays a function of the
    seed and step); `bad` is 'PATH: reason' of the first unreadable file met, or ''. What to do about
    it (`data.on_bad_file`) is the training loop's decision, taken in the main process.
    """

    def __init__(self, images: Dataset, transform: Callable):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> tuple[list[torch.Tensor], int, str]:
        index, sample_seed = key
        bad = ""
        for offset in range(len(self.images)):
            try:
                image, label = self.images[(index + offset) % len(self.images)]
                break
            except BadImageError as exc:
                bad = bad or str(exc)
        else:
            raise BadImageError(f"no image of the dataset can be read (first: {bad})")
        if getattr(self.transform, "deterministic", False):
            return self.transform(image), label, bad
        with seeded(sample_seed):
            views = self.transform(image)
        return views, label, bad


class StepBatchSampler:
    """Yields, for each step from `start_step` to `steps` (None: without end), this process's keys.

    Step s covers global positions [s*G, (s+1)*G) with G = batch_size * world; process `rank` takes
    its contiguous slice. Position g maps to epoch g // N and a per-epoch permutation of the data.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        seed: int,
        start_step: int,
        steps: int | None,
        rank: int = 0,
        world: int = 1,
    ):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start_step, self.steps, self.rank, self.world = start_step, steps, rank, world
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        if self.steps is None:
            raise TypeError("a sampler without end (budgeted run) has no length")
        return max(0, self.steps - self.start_step)

    def key(self, position: int) -> tuple[int, int]:
        epoch = position // self.size
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.size)
        sample_seed = int(np.random.SeedSequence([self.seed, position]).generate_state(1)[0])
        return int(self._perm[position % self.size]), sample_seed

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        global_batch = self.batch_size * self.world
        end = self.steps
        for step in range(self.start_step, end) if end is not None else itertools.count(self.start_step):
            first = step * global_batch + self.rank * self.batch_size
            yield [self.key(g) for g in range(first, first + self.batch_size)]


def _leave_stops_to_the_trainer(_: int) -> None:
    # Ctrl-C, and SIGTERM from a scheduler, reach the whole process group; the training process
    # handles them and checkpoints, which needs its workers alive until then. A SIGTERM from the
    # training process itself is multiprocessing ending its daemonic children at exit (or torch
    # after a shutdown timeout): ignored, it would leave that exit waiting on this worker forever.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # macOS and Windows cannot tell who sent it
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_obey_sigterm_from, args=(os.getppid(),), daemon=True).start()


def _obey_sigterm_from(parent: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)  # exit 0: torch's SIGCHLD handler in the parent reports other exits as failures


def encoded_images(images: Dataset) -> Dataset:
    """`images` as the loader of device-drawn views reads them: JPEG bytes where the dataset stores
    them (shards), so that workers only read and the training device decodes; else as they are."""
    if isinstance(images, Subset):
        return Subset(encoded_images(images.dataset), images.indices)
    return images.as_encoded() if hasattr(images, "as_encoded") else images


def collate_views(batch: list) -> tuple[list, torch.Tensor, list[str]]:
    """(views, label, bad) items -> per view a stacked batch, or a list where sizes differ (JPEG
    bytes of the shards, decoded a whole batch at once on the device)."""
    views, labels, bad = zip(*batch, strict=True)
    stacked = []
    for view in zip(*views, strict=True):
        same = all(v.shape == view[0].shape for v in view)
        stacked.append(torch.stack(view) if same else list(view))
    return stacked, torch.tensor(labels), list(bad)


def build_loader(
    images: Dataset,
    transform: Callable,
    workers: int,
    sampler: StepBatchSampler,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over `sampler`'s steps; batches are (list of view tensors, labels, bad files)."""
    return DataLoader(
        ViewDataset(images, transform),
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        collate_fn=collate_views,
        worker_init_fn=_leave_stops_to_the_trainer if workers > 0 else None,
        # Its own generator, so creating the iterator does not advance the global torch RNG.
        generator=torch.Generator(),
    )
