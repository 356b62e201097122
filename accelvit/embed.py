"""Embeddings of a folder of images: one row per image, its path and its feature vector.

The features are those `accelvit eval` computes (pooled, full tokens, base patch, L2-normalised; the
encoder the objective evaluates with), from a run directory or an exported `.safetensors`.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from accelvit.checkpoint import atomic_path, check_output, run_recipe
from accelvit.compress import forward_features
from accelvit.config import ConfigError, ModelConfig
from accelvit.data import open_rgb
from accelvit.evaluate import extract_features, load_backbone
from accelvit.export import load_export

FORMATS = (".npy", ".csv", ".parquet")


class ImageFiles(Dataset):
    """(image, 0) items of a list of files, in the (image, label) form evaluation reads."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return open_rgb(str(self.paths[index])), 0


def image_files(folder: Path) -> list[Path]:
    """Every image under `folder` (class sub-folders or not), sorted by path."""
    if not folder.is_dir():
        raise ConfigError(f"--data {folder}: not a folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
    if not files:
        raise ConfigError(f"--data {folder}: holds no image ({', '.join(IMG_EXTENSIONS[:4])}, ...)")
    return files


def load_encoder(
    source: Path, checkpoint: str | None = None, encoder: str | None = None
) -> tuple[VisionTransformer, ModelConfig]:
    """The backbone of a run directory (its checkpoint, the objective's evaluation encoder unless
    `encoder` says otherwise) or of an `accelvit export` file, and its model section."""
    if source.is_dir():
        cfg = run_recipe(source, check_paths=False)
        vit, _ = load_backbone(source, cfg, checkpoint, encoder)
        return vit, cfg.model
    if source.suffix != ".safetensors" or not source.is_file():
        raise ConfigError(f"'{source}' is neither a run directory nor a .safetensors export")
    if checkpoint or encoder:
        raise ConfigError(f"--checkpoint and --encoder choose within a run; '{source}' holds one encoder")
    return load_export(source)


def embed_folder(
    vit: VisionTransformer, model: ModelConfig, files: list[Path], batch_size: int, workers: int = 0
) -> torch.Tensor:
    """Features (N, D) of `files`, in order, with a progress bar."""
    vit.eval()
    features, _ = extract_features(
        lambda x: forward_features(vit, x), ImageFiles(files), model.image_size, batch_size,
        torch.device("cpu"), workers, progress="embedding",
    )  # fmt: skip
    return features


def check_format(out: Path) -> None:
    if out.suffix not in FORMATS:
        raise ConfigError(f"-o {out}: the format follows the suffix, one of {', '.join(FORMATS)}")
    if out.suffix == ".parquet" and importlib.util.find_spec("pyarrow") is None:
        raise ConfigError(f"-o {out}: .parquet needs pyarrow (pip install pyarrow); .npy and .csv do not")
    check_output(out)
    if out.suffix == ".npy":
        check_output(paths_file(out))


def paths_file(out: Path) -> Path:
    """The paths of an .npy output, one a line, in its rows' order: OUT.paths.txt."""
    return out.with_suffix(".paths.txt")


def write_embeddings(out: Path, names: list[str], features: torch.Tensor) -> list[Path]:
    """Write rows (name, vector) as .npy + .paths.txt, .csv or .parquet; each file whole or not at all."""
    array = features.numpy().astype(np.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        with atomic_path(out) as tmp:
            np.save(tmp, array)
        with atomic_path(paths_file(out)) as tmp:
            tmp.write_text("".join(n + "\n" for n in names))
        return [out, paths_file(out)]
    if out.suffix == ".csv":
        with atomic_path(out) as tmp, open(tmp, "w", newline="") as f:
            rows = csv.writer(f)
            rows.writerow(["path", *(f"f{i}" for i in range(array.shape[1]))])
            rows.writerows([name, *row.tolist()] for name, row in zip(names, array, strict=True))
        return [out]
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_path(out) as tmp:
        pq.write_table(pa.table({"path": names, "embedding": list(array)}), tmp)
    return [out]
