"""Training-step throughput across compression settings, against the analytic FLOPs limit.

For each (keep, patch) it times a full SimCLR training step (both views, loss, backward, AdamW)
on one fixed batch, reports the median over repeated steps after warm-up, the speedup over the
uncompressed step, the ideal speedup from FLOPs and the efficiency (speedup / ideal). Settings are
timed interleaved, round after round, so machine noise hits them alike.

    python -m benchmarks.throughput                 # ViT-Tiny, 64 px, base patch 8 (CPU-sized)
    python -m benchmarks.throughput --smoke         # seconds; checks the script runs
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accelvit.backbone import build_backbone, vit_shape  # noqa: E402
from accelvit.budget import relative_cost, tokens_per_view  # noqa: E402
from accelvit.config import ModelConfig, ObjectiveConfig, OptimConfig  # noqa: E402
from accelvit.objectives import OBJECTIVES  # noqa: E402
from accelvit.schedule import Setting  # noqa: E402
from accelvit.train import build_optimizer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="vit_tiny_patch16_224")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--patch", type=int, default=8, help="base patch size")
    p.add_argument("--batch", type=int, default=64, help="images per step (two views each)")
    p.add_argument(
        "--grid", default="1.0:8,0.5:8,0.25:8,1.0:16,0.5:16", help="comma-separated keep:patch settings"
    )
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="tiny model and grid, one round")
    p.add_argument("-o", "--output", default=None, help="JSON path (default: benchmarks/results/)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    model_cfg = ModelConfig(arch=args.arch, image_size=args.image_size, patch_size=args.patch)
    if args.smoke:
        model_cfg = ModelConfig(
            arch=args.arch, image_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2
        )
        args.batch, args.grid, args.warmup, args.rounds = 8, "1.0:4,0.5:4,1.0:8", 1, 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    backbone = build_backbone(model_cfg)
    shape = vit_shape(backbone, model_cfg.image_size)
    model = OBJECTIVES["simclr"].build(ObjectiveConfig(), backbone, "query").to(device)
    optimizer = build_optimizer(model, OptimConfig())
    size = model_cfg.image_size
    views = [torch.randn(args.batch, 3, size, size, device=device) for _ in range(2)]
    settings = [Setting(float(k), int(p)) for k, p in (s.split(":") for s in args.grid.split(","))]

    def step(setting: Setting) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(views, setting, 0.0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
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
        ideal = 1 / relative_cost(shape, setting, model_cfg.patch_size)
        speedup = base_time / median
        rows.append(
            {
                "keep": setting.keep,
                "patch": setting.patch,
                "tokens": tokens_per_view(shape, setting),
                "step_s": median,
                "speedup": speedup,
                "ideal": ideal,
                "efficiency": speedup / ideal,
            }
        )

    print(f"{'keep':>5} {'patch':>5} {'tokens':>6} {'step_s':>8} {'speedup':>8} {'ideal':>6} {'eff':>5}")
    for r in rows:
        print(
            f"{r['keep']:5.2f} {r['patch']:5d} {r['tokens']:6d} {r['step_s']:8.4f} "
            f"{r['speedup']:8.2f} {r['ideal']:6.2f} {r['efficiency']:5.2f}"
        )
    import lightly
    import timm

    result = {
        "benchmark": "throughput",
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "lightly": lightly.__version__},
        "model": model_cfg.__dict__,
        "objective": "simclr",
        "batch": args.batch,
        "rounds": args.rounds,
        "rows": rows,
    }
    out = Path(args.output) if args.output else RESULTS / f"throughput-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
