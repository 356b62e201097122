"""Training-step throughput across compression settings, against the analytic FLOPs limit.

For each (keep, patch[, merge]) it times a full training step of the objective (all views, loss, backward,
AdamW, momentum update) on one fixed batch of real views, reports the median over repeated steps
after warm-up, the speedup over the uncompressed step, the ideal speedup from the cost model (all
encoder passes, `budget.step_flops_cost`) and the efficiency (speedup / ideal). Settings are timed
interleaved, round after round, so machine noise hits them alike.

`data_s` is the time the data loader (with `--workers`) takes to deliver one batch of views: where
it exceeds a setting's `step_s`, view generation, not the ViT, sets the pace of that setting.

    python -m benchmarks.throughput                          # ViT-Tiny, 64 px, base patch 8 (CPU)
    python -m benchmarks.throughput --arch vit_small_patch16_224 --image-size 224 --patch 16 \\
        --batch 128 --precision bf16 --grid 1.0:16,0.5:16,0.25:16,1.0:32,0.5:32   # GPU
    python -m benchmarks.throughput --smoke                  # seconds; checks the script runs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also run as `python benchmarks/NAME.py`
from benchmarks.common import device, synchronize, write_result  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--objective", default="simclr", choices=["simclr", "mocov3", "dino"])
    p.add_argument("--arch", default="vit_tiny_patch16_224")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--patch", type=int, default=8, help="base patch size")
    p.add_argument("--batch", type=int, default=64, help="images per step")
    p.add_argument(
        "--grid", default="1.0:8,0.5:8,0.25:8,1.0:16,0.5:16,1.0:8:0.2", help="keep:patch[:merge] settings"
    )
    p.add_argument("--workers", type=int, default=2, help="data-loader workers for data_s")
    p.add_argument("--precision", default="no", choices=["no", "bf16"])
    p.add_argument(
        "--compile", default="no", choices=["no", "default", "reduce-overhead", "max-autotune"],
        help="train.compile: the backbone forward compiled per setting (warm-up steps compile)",
    )  # fmt: skip
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="tiny model and grid, one round")
    p.add_argument("-o", "--output", default=None, help="JSON path (default: benchmarks/results/)")
    return p.parse_args(argv)


def views_and_data_time(cfg, batch: int, workers: int, batches: int) -> tuple[list[torch.Tensor], float]:
    """One batch of the objective's views of real images, and the loader's steady time per batch.

    The loader's prefetched batches (2 per worker) are drained first, so the timed ones are produced
    while waiting, as in a training loop whose steps are faster than its data.
    """
    from accelvit.data import StepBatchSampler, build_loader, load_dataset
    from accelvit.objectives import OBJECTIVES

    images = load_dataset(cfg.data)
    transform = OBJECTIVES[cfg.objective.name].transform(cfg.objective, cfg.model, cfg.data)
    prefetched = 2 * workers + 1
    sampler = StepBatchSampler(len(images), batch, 0, 0, prefetched + batches)
    loader = iter(build_loader(images, transform, workers, sampler))
    for _ in range(prefetched):
        views, _, _ = next(loader)
    tick = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return views, (time.perf_counter() - tick) / batches


def main(argv: list[str] | None = None) -> dict:
    from accelvit.backbone import vit_shape
    from accelvit.budget import tokens_per_view
    from accelvit.build import build_model, build_optimizer, flops_cost
    from accelvit.compress import compiled_features
    from accelvit.config import Config, DataConfig, ModelConfig, ObjectiveConfig, OptimConfig
    from accelvit.setting import Setting, parse_strategies

    args = parse_args(argv)
    model_cfg = ModelConfig(arch=args.arch, image_size=args.image_size, patch_size=args.patch)
    if args.smoke:
        model_cfg = ModelConfig(
            arch=args.arch, image_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2
        )
        args.batch, args.grid, args.warmup, args.rounds, args.workers = (
            8,
            "1.0:4,0.5:4,1.0:8,1.0:4:0.25",
            1,
            1,
            0,
        )
    fmnist = DataConfig().root
    data = DataConfig(workers=args.workers) if _has_fashion_mnist(fmnist) else DataConfig(dataset="synthetic")
    cfg = Config(model=model_cfg, data=data, objective=ObjectiveConfig(name=args.objective))
    dev = device()
    torch.manual_seed(0)
    model = build_model(cfg).to(dev)
    optimizer = build_optimizer(model, OptimConfig())
    views, data_s = views_and_data_time(cfg, args.batch, args.workers, max(2 * args.rounds, 4))
    views = [v.to(dev) for v in views]
    settings = parse_strategies(args.grid)
    shape = vit_shape(model.backbone, model_cfg.image_size)
    cost = flops_cost(cfg, shape)

    def step(setting: Setting) -> float:
        synchronize()
        start = time.perf_counter()
        autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
        with autocast, compiled_features(args.compile):
            loss = model(views, setting, 0.0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_momentum(0.0)
        synchronize()
        return time.perf_counter() - start

    for setting in settings:
        for _ in range(args.warmup):
            step(setting)
    times: dict[Setting, list[float]] = {s: [] for s in settings}
    for _ in range(args.rounds):
        for setting in settings:
            times[setting].append(step(setting))

    full = Setting(1.0, model_cfg.patch_size)
    base_time = statistics.median(times.get(full) or [float("nan")])
    rows = []
    for setting in settings:
        median = statistics.median(times[setting])
        ideal = cost(full) / cost(setting)
        speedup = base_time / median
        rows.append(
            {
                "keep": setting.keep,
                "patch": setting.patch,
                "merge": setting.merge,
                "tokens": tokens_per_view(shape, setting),
                "step_s": median,
                "data_s": data_s,
                "speedup": speedup,
                "ideal": ideal,
                "efficiency": speedup / ideal,
            }
        )
    print(format_table(rows))
    result = {
        "model": model_cfg.__dict__,
        "objective": args.objective,
        "data": data.dataset,
        "workers": args.workers,
        "precision": args.precision,
        "compile": args.compile,
        "batch": args.batch,
        "rounds": args.rounds,
        "rows": rows,
    }
    name = "throughput" if args.objective == "simclr" else f"throughput-{args.objective}"
    return write_result(name, result, args.output)


def format_table(rows: list[dict]) -> str:
    lines = [
        f"{'keep':>5} {'patch':>5} {'merge':>5} {'tokens':>6} {'step_s':>8} {'data_s':>8} {'speedup':>8} "
        f"{'ideal':>6} {'eff':>5}"
    ]
    for r in rows:
        lines.append(
            f"{r['keep']:5.2f} {r['patch']:5d} {r['merge']:5.2f} {r['tokens']:6d} {r['step_s']:8.4f} "
            f"{r['data_s']:8.4f} {r['speedup']:8.2f} {r['ideal']:6.2f} {r['efficiency']:5.2f}"
        )
    return "\n".join(lines)


def _has_fashion_mnist(root: str) -> bool:
    return (Path(root) / "train-images-idx3-ubyte.gz").is_file()


if __name__ == "__main__":
    main()
