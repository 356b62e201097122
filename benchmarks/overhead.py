"""accelvit's training step at keep 1 and the base patch against a plain lightly + timm SimCLR step.

The plain step is written here the way lightly's own SimCLR example writes it (timm ViT,
`SimCLRProjectionHead`, `NTXentLoss`, AdamW). accelvit's step is `step.train_step`, the loop's own
(resampled-kernel patch embedding, finiteness check, buffer snapshot), through an `Accelerator`. Both
start from the same weights and take the same batch; steps alternate, and the ratio of the medians
is reported (target <= 1.03), with peak memory: allocated on a GPU, resident (RSS, each step in a
fresh process) on a CPU.

    python -m benchmarks.overhead            # ViT-Tiny, 64 px, patch 8, batch 64 (CPU)
    python -m benchmarks.overhead --smoke
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also run as `python benchmarks/NAME.py`
from accelvit.config import ModelConfig, ObjectiveConfig, OptimConfig  # noqa: E402
from benchmarks.common import device, synchronize, write_result  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="vit_tiny_patch16_224")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("-o", "--output", default=None)
    return p.parse_args(argv)


def plain_lightly_step(vit, head, criterion, optimizer, x0, x1) -> None:
    z0 = head(vit(x0))
    z1 = head(vit(x1))
    loss = criterion(z0, z1)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def build_steps(args: argparse.Namespace) -> dict:
    """The two steps, {"accelvit": fn, "lightly": fn}, from the same weights on the same batch."""
    import copy

    import timm
    from accelerate import Accelerator
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead

    from accelvit.build import build_model, build_optimizer
    from accelvit.config import Config
    from accelvit.nonfinite import Guard
    from accelvit.setting import Setting
    from accelvit.step import train_step

    dev = device()
    model_cfg, objective_cfg = model_config(args), ObjectiveConfig()

    # accelvit
    accelerator = Accelerator(cpu=dev.type == "cpu")
    torch.manual_seed(0)
    model = build_model(Config(model=model_cfg, objective=objective_cfg))
    initial = copy.deepcopy(model.state_dict())
    optimizer = build_optimizer(model, OptimConfig())
    model, optimizer = accelerator.prepare(model, optimizer)

    # plain lightly + timm, same weights
    vit = timm.create_model(
        args.arch, num_classes=0, img_size=args.image_size, patch_size=args.patch, **model_extra(args)
    ).to(dev)
    head = SimCLRProjectionHead(vit.num_features, objective_cfg.hidden_dim, objective_cfg.out_dim).to(dev)
    vit.load_state_dict(
        {k.removeprefix("backbone."): v for k, v in initial.items() if k.startswith("backbone.")}
    )
    head.load_state_dict({k.removeprefix("head."): v for k, v in initial.items() if k.startswith("head.")})
    criterion = NTXentLoss(temperature=objective_cfg.temperature)
    plain_optimizer = torch.optim.AdamW(list(vit.parameters()) + list(head.parameters()), lr=1e-3)

    x0, x1 = (torch.randn(args.batch, 3, args.image_size, args.image_size, device=dev) for _ in range(2))
    setting, guard = Setting(1.0, args.patch), Guard(dev, "skip", 10**9)
    return {
        "accelvit": lambda: train_step(
            accelerator, model, optimizer, [x0, x1], setting, 0.5, None, "no", guard
        ),
        "lightly": lambda: plain_lightly_step(vit, head, criterion, plain_optimizer, x0, x1),
    }


def model_extra(args: argparse.Namespace) -> dict:
    return {"embed_dim": 32, "depth": 2, "num_heads": 2} if args.smoke else {}


def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(arch=args.arch, image_size=args.image_size, patch_size=args.patch, **model_extra(args))


def peak_rss_mib(args: argparse.Namespace, name: str | None) -> float | None:
    """CPU: peak resident memory of a fresh process that builds both steps and runs only `name`'s
    (None: neither, the floor both numbers share)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_run_and_measure, (args, name))


def _run_and_measure(args: argparse.Namespace, name: str | None) -> float | None:
    steps = build_steps(args)
    for _ in range(args.warmup + 1 if name else 0):
        steps[name]()
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over exec, so a spawned child would
    # report its parent's peak
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    line = next(x for x in status.read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024  # kB


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.smoke:
        args.image_size, args.patch, args.batch, args.warmup, args.rounds = 16, 4, 8, 1, 2
    dev = device()
    steps = build_steps(args)

    def timed(fn) -> tuple[float, int | None]:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        synchronize()
        tick = time.perf_counter()
        fn()
        synchronize()
        seconds = time.perf_counter() - tick
        return seconds, torch.cuda.max_memory_allocated() if dev.type == "cuda" else None

    for _ in range(args.warmup):
        for step in steps.values():
            step()
    samples: dict[str, list[tuple[float, int | None]]] = {name: [] for name in steps}
    for _ in range(args.rounds):  # alternating, so drifts of a noisy machine hit both alike
        for name, step in steps.items():
            samples[name].append(timed(step))
    rows = []
    for name, values in samples.items():
        memory = [m for _, m in values if m is not None]
        rows.append(
            {
                "step": name,
                "step_s": statistics.median(t for t, _ in values),
                "peak_memory_mib": max(memory) / 2**20 if memory else None,
                "peak_rss_mib": peak_rss_mib(args, name) if dev.type == "cpu" else None,
            }
        )
    ratio = rows[0]["step_s"] / rows[1]["step_s"]
    print(f"{'step':>9} {'step_s':>8} {'peak MiB':>9} {'peak RSS MiB':>13}")
    for r in rows:
        mem = f"{r['peak_memory_mib']:9.1f}" if r["peak_memory_mib"] is not None else f"{'-':>9}"
        rss = f"{r['peak_rss_mib']:13.1f}" if r["peak_rss_mib"] is not None else f"{'-':>13}"
        print(f"{r['step']:>9} {r['step_s']:8.4f} {mem} {rss}")
    print(f"accelvit / lightly: {ratio:.3f} (target <= 1.03)")
    result: dict = {
        "model": model_config(args).__dict__,
        "objective": "simclr",
        "batch": args.batch,
        "rounds": args.rounds,
        "rows": rows,
        "ratio": ratio,
        "peak_rss_built_mib": peak_rss_mib(args, None) if dev.type == "cpu" else None,
    }
    if result["peak_rss_built_mib"] is not None:
        print(
            f"peak RSS with models and batch built, before any step: {result['peak_rss_built_mib']:.1f} MiB"
        )
    return write_result("overhead", result, args.output)


if __name__ == "__main__":
    main()
