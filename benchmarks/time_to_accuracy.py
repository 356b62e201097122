"""Time to accuracy on Fashion-MNIST: baseline against accelerated recipe at the same budgets.

For SimCLR, MoCo-v3 and DINO it trains `recipes/OBJ-fmnist-baseline.yaml` and
`recipes/OBJ-fmnist-accel.yaml` for budgets B, 2B, 4B, 8B (B: `--base-steps` uncompressed steps),
evaluates each run's kNN top-1 and reports the speedup: the smallest accelerated budget whose
accuracy reaches the baseline's at the largest budget, as a budget ratio and as a wall-clock ratio
(the reference's ImageNet figures: 4x MoCo-v3, 3.3x SimCLR, 2.5x DINO). It also reports the kNN
top-1 of the untrained backbone: early in training a run can sit below it, and a speedup measured
there only says which run leaves that dip first.

    python -m benchmarks.time_to_accuracy            # recipe-sized models, B = 10 (42 min on 2 CPU cores)
    python -m benchmarks.time_to_accuracy --quick    # a 4-block ViT, B = 6 (9.5 min)
    python -m benchmarks.time_to_accuracy --gpu      # batch 256, B = 250 (8B: 8.5 epochs), bf16, full splits
    python -m benchmarks.time_to_accuracy --smoke    # synthetic data, seconds
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also run as `python benchmarks/NAME.py`
from benchmarks.common import (  # noqa: E402
    BUDGETED_RUN,
    REPO,
    SMOKE_RECIPE,
    model_shape,
    untrained_knn,
    write_result,
)

QUICK = ["model.depth=4", "train.batch_size=64", "eval.train_limit=5000", "eval.test_limit=1000"]
GPU = ["train.batch_size=256", "train.precision=bf16", "eval.train_limit=null", "eval.test_limit=null"]
SMOKE = [
    *SMOKE_RECIPE,
    "eval.train_limit=64",
    "eval.test_limit=32",
    "objective.local_crops=0",
    "objective.hidden_dim=32",
    "objective.bottleneck_dim=16",
    "objective.out_dim=32",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--objectives", default="simclr,mocov3,dino")
    p.add_argument("--base-steps", type=int, help="B, uncompressed steps (default 10; --quick 6; --gpu 250)")
    p.add_argument("--budgets", type=int, default=4, help="how many doublings of B")
    p.add_argument("--augment", default="device", choices=["cpu", "device"], help="data.augment of every run")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true")
    size.add_argument("--gpu", action="store_true", help="a size for one GPU (runs anywhere, slowly)")
    size.add_argument("--smoke", action="store_true")
    p.add_argument("-o", "--output", default=None)
    return p.parse_args(argv)


def train_and_eval(recipe: Path, overrides: list[str], run_dir: Path) -> dict:
    """One budgeted run, its kNN top-1 and wall time (training only)."""
    from accelvit.checkpoint import create_run_dir
    from accelvit.config import load_config
    from accelvit.evaluate import evaluate_run
    from accelvit.train import pretrain

    cfg = load_config(recipe, overrides)
    create_run_dir(run_dir, cfg)
    tick = time.perf_counter()
    result = pretrain(cfg, run_dir)
    wall = time.perf_counter() - tick
    return {"steps": result.step, "wall_s": wall, "knn_top1": evaluate_run(run_dir)["knn_top1"]}


def full_step_units(recipe: Path, overrides: list[str]) -> float:
    """Budget units of one uncompressed step of `recipe` (per image x batch)."""
    from accelvit.budget import flops_cost_fn
    from accelvit.config import load_config
    from accelvit.objectives import OBJECTIVES
    from accelvit.schedule import Setting

    cfg = load_config(recipe, [*overrides, "train.budget=1"], check_paths=False)
    shape = model_shape(cfg)
    branches = OBJECTIVES[cfg.objective.name].branches(cfg.objective, cfg.model, cfg.schedule.dropout_views)
    cost = flops_cost_fn(shape, branches, cfg.model.patch_size)
    return cost(Setting(1.0, cfg.model.patch_size)) * cfg.train.batch_size


def speedup(rows: list[dict]) -> dict:
    """Smallest accelerated budget reaching the baseline's accuracy at its largest budget."""
    baseline = {r["budget"]: r for r in rows if r["recipe"] == "baseline"}
    accel = sorted((r for r in rows if r["recipe"] == "accel"), key=lambda r: r["budget"])
    top = baseline[max(baseline)]
    reached = next((r for r in accel if r["knn_top1"] >= top["knn_top1"]), None)
    if reached is None:
        best = max(accel, key=lambda r: r["knn_top1"])
        return {"target": top["knn_top1"], "reached": False, "best_accel": best["knn_top1"]}
    return {
        "target": top["knn_top1"],
        "reached": True,
        "budget_ratio": top["budget"] / reached["budget"],
        "wall_ratio": top["wall_s"] / reached["wall_s"],
    }


def sized(args: argparse.Namespace) -> tuple[str, list[str], int]:
    """The run size the flags ask for, the overrides every run of it gets, and B in steps."""
    size = "smoke" if args.smoke else "quick" if args.quick else "gpu" if args.gpu else "full"
    overrides = [*BUDGETED_RUN, f"data.augment={args.augment}"]
    overrides += {"smoke": SMOKE, "quick": QUICK, "gpu": GPU, "full": []}[size]
    base_steps = args.base_steps or {"smoke": 2, "quick": 6, "gpu": 250, "full": 10}[size]
    return size, overrides, base_steps


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    size, common, args.base_steps = sized(args)
    if args.smoke:
        args.budgets = 2
    objectives = args.objectives.split(",")
    rows, summary, untrained = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in objectives:
            baseline = REPO / f"recipes/{name}-fmnist-baseline.yaml"
            unit = full_step_units(baseline, common)
            untrained[name] = untrained_knn(baseline, [*common, "train.budget=1"])
            print(f"{name:>7} untrained backbone: kNN top-1 {untrained[name]:.4f}", flush=True)
            for i in range(args.budgets):
                budget = args.base_steps * 2**i * unit
                for kind in ("baseline", "accel"):
                    recipe = REPO / f"recipes/{name}-fmnist-{kind}.yaml"
                    run = train_and_eval(
                        recipe, [*common, f"train.budget={budget}"], Path(tmp) / f"{name}-{kind}-{i}"
                    )
                    rows.append({"objective": name, "recipe": kind, "budget": budget, **run})
                    print(
                        f"{name:>7} {kind:>8} budget {budget:10.4g} ({run['steps']:5d} steps, "
                        f"{run['wall_s']:6.1f} s): kNN top-1 {run['knn_top1']:.4f}",
                        flush=True,
                    )
            summary[name] = speedup([r for r in rows if r["objective"] == name])
    print(format_table(rows, summary, untrained))
    result = {
        "dataset": "synthetic" if args.smoke else "fashion-mnist",
        "size": size,
        "overrides": common,
        "base_steps": args.base_steps,
        "untrained_knn": untrained,
        "rows": rows,
        "speedup": summary,
    }
    name = (
        "time_to_accuracy"
        + ("" if size == "full" else f"-{size}")
        + ("-device-augment" if args.augment == "device" else "")
    )
    return write_result(name, result, args.output)


def format_table(rows: list[dict], summary: dict, untrained: dict) -> str:
    lines = [
        "| objective | budget | baseline kNN | accel kNN | baseline s | accel s |",
        "|---|---|---|---|---|---|",
    ]
    pairs: dict[tuple, dict] = {}
    for r in rows:
        pairs.setdefault((r["objective"], r["budget"]), {})[r["recipe"]] = r
    for (name, budget), pair in pairs.items():
        b, a = pair["baseline"], pair["accel"]
        lines.append(
            f"| {name} | {budget:.4g} | {b['knn_top1']:.4f} | {a['knn_top1']:.4f} "
            f"| {b['wall_s']:.0f} | {a['wall_s']:.0f} |"
        )
    lines.append("")
    for name, s in summary.items():
        lines.append(f"{name}: the untrained backbone has kNN top-1 {untrained[name]:.4f}")
        if s["reached"]:
            lines.append(
                f"{name}: accelerated reaches {s['target']:.4f} with {s['budget_ratio']:.2f}x less budget, "
                f"{s['wall_ratio']:.2f}x less wall-clock time"
            )
        else:
            lines.append(f"{name}: accelerated does not reach {s['target']:.4f} (best {s['best_accel']:.4f})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
