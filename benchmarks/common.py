"""What every benchmark records: the device, library versions, and where the JSON goes."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

SMOKE_RECIPE = [  # --set overrides that turn a recipe into a seconds-long run on synthetic images
    "data.dataset=synthetic",
    "data.limit=64",
    "data.workers=0",
    "model.image_size=16",
    "model.embed_dim=32",
    "model.depth=2",
    "model.num_heads=2",
    "train.batch_size=8",
]

SMOKE_SCORED = [  # and for runs that are scored: small kNN splits, small heads, no local crops
    *SMOKE_RECIPE,
    "eval.train_limit=64",
    "eval.test_limit=32",
    "objective.local_crops=0",
    "objective.hidden_dim=32",
    "objective.bottleneck_dim=16",
    "objective.out_dim=32",
]

BUDGETED_RUN = [  # --set overrides of a benchmark's budgeted run: no steps, no online eval, one checkpoint
    "train.steps=null",
    "train.eval_every=null",
    "train.checkpoint_every=1000000",
    "train.log_every=10",
]


def untrained_knn(recipe: Path, overrides: list[str]) -> float:
    """kNN top-1 of the recipe's backbone at initialisation (the run's seed): the floor to beat."""
    from accelerate.utils import set_seed

    from accelvit.backbone import build_backbone
    from accelvit.config import load_config
    from accelvit.evaluate import evaluate_backbone

    cfg = load_config(recipe, overrides)
    set_seed(cfg.train.seed)  # as `pretrain` seeds before it builds the backbone
    vit = build_backbone(cfg.model)
    return evaluate_backbone(vit, cfg.model, cfg.data, cfg.eval, device())["knn_top1"]


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def environment() -> dict:
    import lightly
    import timm

    dev = device()
    name = (
        torch.cuda.get_device_name() if dev.type == "cuda" else (platform.processor() or platform.machine())
    )
    return {
        "device": f"{dev.type}: {name}",
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "lightly": lightly.__version__},
    }


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def write_result(name: str, result: dict, output: str | None) -> dict:
    """Add the environment, write JSON to `output` (or benchmarks/results/NAME-DEVICE.json), return it."""
    out = Path(output) if output else RESULTS / f"{name}-{device().type}.json"
    full = {"benchmark": name, **environment(), **result}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(full, indent=1) + "\n")
    print(f"wrote {out}")
    return full
