"""Evaluation of a pretrained backbone on the labelled splits of the run's dataset.

Weighted kNN (Wu et al., "Unsupervised feature learning via non-parametric instance discrimination",
2018, as used by DINO): cosine similarity to the k nearest training features, votes weighted by
exp(sim / T). Optionally a linear probe on the frozen features. Features use the full token set and
the base patch size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from lightly.transforms.utils import IMAGENET_NORMALIZE
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms as T
from tqdm import tqdm

from accelvit.backbone import build_backbone
from accelvit.checkpoint import check_output, checkpoint_step, run_recipe, write_atomic
from accelvit.compress import forward_features
from accelvit.config import Config, ConfigError, DataConfig, EvalConfig, ModelConfig
from accelvit.data import load_dataset
from accelvit.export import backbone_weights, chosen_encoder, resolve_checkpoint

EVAL_FILE = "eval.json"


class Transformed(Dataset):
    """(image, label) items of `images` with `transform` applied to the image."""

    def __init__(self, images: Dataset, transform: T.Compose):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.images[index]
        return self.transform(image), label


def eval_transform(image_size: int) -> T.Compose:
    return T.Compose(
        [
            T.Resize((image_size, image_size)),
            T.ToTensor(),
            T.Normalize(IMAGENET_NORMALIZE["mean"], IMAGENET_NORMALIZE["std"]),
        ]
    )


def _first(images: Dataset, limit: int | None) -> Dataset:
    return Subset(images, range(limit)) if limit is not None and limit < len(images) else images


def labelled_splits(data: DataConfig, cfg: EvalConfig) -> tuple[Dataset, Dataset]:
    """The kNN memory bank (whole train split, or its first `eval.train_limit`) and the test split."""
    return (
        _first(load_dataset(data, train=True, limited=False), cfg.train_limit),
        _first(load_dataset(data, train=False), cfg.test_limit),
    )


@torch.no_grad()
def extract_features(
    encode,
    images: Dataset,
    image_size: int,
    batch_size: int,
    device: torch.device,
    workers: int = 0,
    progress: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features (N, D) of `encode(batch)` and labels (N,) over a labelled dataset;
    `progress`: the label of a progress bar (none by default: inside a run the step bar is shown)."""
    loader = DataLoader(
        Transformed(images, eval_transform(image_size)),
        batch_size=batch_size,
        num_workers=workers,
        generator=torch.Generator(),  # leaves the global RNG (token dropout) untouched
    )
    feats, labels = [], []
    for x, y in tqdm(loader, desc=progress, unit="batch", disable=progress is None, leave=False):
        feats.append(F.normalize(encode(x.to(device)).float(), dim=1).cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def knn_top1(
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 512,
) -> float:
    """Top-1 accuracy of the weighted kNN classifier (features already L2-normalised)."""
    from lightly.utils.benchmarking import knn_predict  # imports pytorch_lightning: only when used

    bank, bank_labels = train[0].T.contiguous(), train[1]
    num_classes = int(max(bank_labels.max(), test[1].max())) + 1
    correct = 0
    for start in range(0, len(test[0]), chunk):
        feats, labels = test[0][start : start + chunk], test[1][start : start + chunk]
        pred = knn_predict(feats, bank, bank_labels, num_classes, min(k, bank.shape[1]), temperature)
        correct += int((pred[:, 0] == labels).sum())
    return correct / len(test[0])


def linear_probe_top1(
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    epochs: int = 10,
    seed: int = 0,
) -> float:
    """Top-1 accuracy of a linear classifier trained on frozen, standardised features."""
    generator = torch.Generator().manual_seed(seed)
    mean, std = train[0].mean(0), train[0].std(0) + 1e-6
    x_train, x_test = (train[0] - mean) / std, (test[0] - mean) / std
    num_classes = int(max(train[1].max(), test[1].max())) + 1
    with torch.random.fork_rng(devices=[]):  # its initial weights from `seed`, not from the caller's state
        torch.manual_seed(seed)
        probe = torch.nn.Linear(x_train.shape[1], num_classes)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(epochs):
        for idx in torch.randperm(len(x_train), generator=generator).split(256):
            loss = F.cross_entropy(probe(x_train[idx]), train[1][idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return (probe(x_test).argmax(1) == test[1]).float().mean().item()


def evaluate_backbone(
    vit: VisionTransformer,
    model: ModelConfig,
    data: DataConfig,
    cfg: EvalConfig,
    device: torch.device,
    progress: bool = False,
) -> dict:
    """kNN (and optionally linear-probe) top-1 of `vit` on the dataset's train/test splits;
    `progress`: a bar per split (a standalone evaluation; inside a run the step bar is shown)."""
    was_training = vit.training
    vit.eval()
    try:
        train, test = (
            extract_features(
                lambda x: forward_features(vit, x),
                images,
                model.image_size,
                cfg.batch_size,
                device,
                progress=f"{split} features" if progress else None,
            )  # fmt: skip
            for split, images in zip(("train", "test"), labelled_splits(data, cfg), strict=True)
        )
    finally:
        vit.train(was_training)
    result = {
        "knn_top1": knn_top1(train, test, cfg.k, cfg.temperature),
        "k": cfg.k,
        "temperature": cfg.temperature,
        "train_size": len(train[0]),
        "test_size": len(test[0]),
    }
    if cfg.linear:
        result["linear_top1"] = linear_probe_top1(train, test, cfg.linear_epochs)
    return result


def pixel_knn(model: ModelConfig, data: DataConfig, cfg: EvalConfig) -> float:
    """kNN top-1 on raw (resized, normalised) pixels: the baseline a backbone must beat."""
    train, test = (
        extract_features(lambda x: x.flatten(1), s, model.image_size, cfg.batch_size, torch.device("cpu"))
        for s in labelled_splits(data, cfg)
    )
    return knn_top1(train, test, cfg.k, cfg.temperature)


def load_backbone(
    run_dir: Path, cfg: Config, checkpoint: str | None = None, encoder: str | None = None
) -> tuple[VisionTransformer, int]:
    """The backbone of a run's checkpoint (newest by default) and that checkpoint's step; `cfg` is
    the run's recipe (`checkpoint.run_recipe`).

    `encoder`: student or teacher (null: `eval.encoder`, else the objective's reference choice).
    """
    path = resolve_checkpoint(run_dir, checkpoint)
    vit = build_backbone(cfg.model)
    vit.load_state_dict(backbone_weights(path, chosen_encoder(cfg, encoder)))
    return vit, checkpoint_step(path)


def evaluate_run(
    run_dir: Path,
    checkpoint: str | None = None,
    linear: bool = False,
    pixels: bool = False,
    encoder: str | None = None,
    overrides: list[str] = (),
) -> dict:
    """Evaluate a run's checkpoint; writes RUN_DIR/eval.json and returns its content.

    `overrides`: `eval.*` keys (`--set eval.k=10`); the model and data are the run's own.
    """
    for item in overrides:
        if not item.startswith("eval."):
            raise ConfigError(f"--set {item.partition('=')[0]}: eval takes eval.* keys only")
    cfg = run_recipe(run_dir, overrides)
    check_output(run_dir / EVAL_FILE, "eval")  # before the minutes of feature extraction
    if linear:
        cfg.eval.linear = True
    vit, step = load_backbone(run_dir, cfg, checkpoint, encoder)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    which = "student" if chosen_encoder(cfg, encoder) == "backbone" else "teacher"
    result = {
        "step": step,
        "encoder": which,
        **evaluate_backbone(vit.to(device), cfg.model, cfg.data, cfg.eval, device, progress=True),
    }
    if pixels:
        result["pixel_knn_top1"] = pixel_knn(cfg.model, cfg.data, cfg.eval)
    write_atomic(run_dir / EVAL_FILE, json.dumps(result, indent=1) + "\n")
    return result
