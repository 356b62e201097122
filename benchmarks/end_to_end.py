"""Wall clock against budget, end to end: the accelerated schedule and the baseline's, data included.

Each side is a real `pretrain` of `--steps` steps from the recipe (the accelerated one with its
schedule squeezed into those steps, the baseline at keep 1 and the base patch), its loader, views,
step and logging all in the timing. The first of `--windows` log windows is left out (warm-up, and
compilation with `train.compile`). Reported: each side's wall seconds and budget units over the
timed windows, and `end_to_end: {wall_ratio, budget_ratio}`; target: wall_ratio >= 0.9 budget_ratio.

    python -m benchmarks.end_to_end --recipe recipes/imagenet-simclr-vits16.yaml --steps 200 \\
        --set data.dataset=shards --set data.root=SHARDS --set data.augment=device   # one GPU
    python -m benchmarks.end_to_end --smoke
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also run as `python benchmarks/NAME.py`
from accelvit.checkpoint import create_run_dir, read_metrics  # noqa: E402
from accelvit.config import load_config  # noqa: E402
from accelvit.train import pretrain  # noqa: E402
from benchmarks.common import REPO, SMOKE_RECIPE, write_result  # noqa: E402

BASELINE = ["schedule.keep=1.0", "schedule.merge=0.0", "schedule.mode=fixed"]  # and the base patch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=str(REPO / "recipes/simclr-fmnist-accel.yaml"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--windows", type=int, default=10, help="log windows; the first is not timed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("-o", "--output", default=None)
    return p.parse_args(argv)


def timed_run(recipe: str, overrides: list[str], run_dir: Path) -> dict:
    """Wall seconds and budget units of a run's log windows after the first."""
    cfg = load_config(recipe, overrides)
    create_run_dir(run_dir, cfg)
    pretrain(cfg, run_dir)
    records = [r for r in read_metrics(run_dir) if "images_per_s" in r]
    batch = cfg.train.batch_size
    windows = zip(records, records[1:], strict=False)
    walls = [(b["step"] - a["step"]) * batch / b["images_per_s"] for a, b in windows]
    return {
        "steps": records[-1]["step"] - records[0]["step"],
        "wall_s": sum(walls),
        "budget": records[-1]["budget_spent"] - records[0]["budget_spent"],
        "data_s": sum(r["data_s"] for r in records[1:]),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.smoke:
        args.steps, args.windows, args.set = 8, 4, [*SMOKE_RECIPE, *args.set]
    common = [
        *args.set,
        f"train.steps={args.steps}",
        "train.budget=null",
        "train.eval_every=null",
        f"train.checkpoint_every={args.steps}",
        f"train.log_every={max(1, args.steps // args.windows)}",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        accel = timed_run(args.recipe, common, Path(tmp) / "accel")
        base_patch = load_config(args.recipe, common).model.patch_size
        baseline = timed_run(
            args.recipe, [*common, *BASELINE, f"schedule.patch={base_patch}"], Path(tmp) / "baseline"
        )
    ratios = {
        "wall_ratio": baseline["wall_s"] / accel["wall_s"],
        "budget_ratio": baseline["budget"] / accel["budget"],
    }
    print(
        f"{args.steps} steps: baseline {baseline['wall_s']:.1f} s / {baseline['budget']:.4g} units, "
        f"accelerated {accel['wall_s']:.1f} s / {accel['budget']:.4g} units: "
        f"wall {ratios['wall_ratio']:.2f}x, budget {ratios['budget_ratio']:.2f}x"
    )
    result = {
        "recipe": Path(args.recipe).name,
        "overrides": args.set,
        "baseline": baseline,
        "accel": accel,
        "end_to_end": ratios,
    }
    return write_result("end_to_end" + ("-smoke" if args.smoke else ""), result, args.output)


if __name__ == "__main__":
    main()
