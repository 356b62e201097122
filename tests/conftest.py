from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from accelvit.config import Config, load_config

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# A ViT small enough that a training step takes milliseconds on a CPU.
TINY = {
    "model": {
        "arch": "vit_tiny_patch16_224",
        "image_size": 16,
        "patch_size": 4,
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 2,
    },
    "data": {"dataset": "synthetic", "workers": 0, "limit": 64},
    "objective": {"name": "simclr", "hidden_dim": 32, "out_dim": 16},
    "schedule": {
        "keep": {"shape": "linear", "start": 0.5, "end": 1.0},
        "patch": {"shape": "step", "points": [[0.0, 8], [0.5, 4]]},
    },
    "optim": {"lr": 1e-3, "warmup": 0.2},
    "train": {"steps": 6, "batch_size": 8, "log_every": 1, "checkpoint_every": 3, "keep_checkpoints": 5},
}


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    # accelerate keeps one process-wide state; tests train with different precisions in turn.
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Path:
    return write_recipe(tmp_path / "tiny.yaml", TINY)


@pytest.fixture
def tiny_config(tiny_recipe: Path) -> Config:
    return load_config(tiny_recipe)


@pytest.fixture
def fashion_mnist() -> Path:
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist)")
    return FASHION_MNIST
