"""Compression study: token dropout, patch scaling and token merging at equal cost, on Fashion-MNIST.

SimCLR with `recipes/simclr-fmnist-baseline.yaml` (a 4-block ViT-Tiny at 32 px, batch 64, unless
`--full`), all runs at one budget of `--budget-steps` uncompressed steps:

1. Time to accuracy: the baseline and three curricula that start at about a quarter of the full
   step's FLOPs and reach full input at progress 0.75 (dropout: keep 0.25, 0.5, 0.75, 1 in four
   steps; patch scaling: 2x patch, then the base; merging: the merge fraction m closest to keep
   0.25's FLOPs, then 2m/3, m/3, 0). Each run's kNN top-1 and training wall time.
2. Gradient error: on the baseline's final checkpoint, one grad-error report of dropout and merging
   at keep 0.5's FLOPs, and of dropout, 2x patch and keep 0.5 + merging at keep 0.25's: is
   averaging tokens (merging) less biased than discarding them (dropout) at equal cost?
3. Attention entropy: diagnostics every few steps of the baseline and of the dropout and merge
   curricula, plotted per block against progress: does compression move the moment attention snaps?

    python -m benchmarks.compression_study            # about 14 minutes on 2 CPU cores
    python -m benchmarks.compression_study --smoke    # synthetic data, seconds
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also run as `python benchmarks/NAME.py`
from benchmarks.common import BUDGETED_RUN, REPO, RESULTS, SMOKE_RECIPE, write_result  # noqa: E402
from benchmarks.time_to_accuracy import full_step_units  # noqa: E402

RECIPE = REPO / "recipes/simclr-fmnist-baseline.yaml"
# The study's model and views as measured in the README, pinned against later changes of the recipe
STUDY = [
    "model.embed_dim=192",
    "model.num_heads=3",
    "model.stem=[]",
    "data.augment=cpu",
    "data.crop_min_scale=0.08",
]
QUICK = ["model.depth=4", "train.batch_size=64", "eval.train_limit=5000", "eval.test_limit=1000"]
SMOKE = [*SMOKE_RECIPE, "eval.train_limit=64", "eval.test_limit=32", "objective.hidden_dim=32"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--budget-steps", type=int, default=None, help="budget in uncompressed steps (default 300)"
    )
    p.add_argument("--batches", type=int, default=8, help="K of the grad-error report")
    p.add_argument("--full", action="store_true", help="the recipe's own 6-block model and batch 128")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("-o", "--output", default=None, help="JSON path (figures and report go beside it)")
    return p.parse_args(argv)


def train_and_eval(recipe: Path, overrides: list[str], run_dir: Path) -> dict:
    """One budgeted run, its kNN top-1 and wall time (training only)."""
    import time

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


def relative_flops(cfg) -> Callable[..., float]:
    """`cost(keep=1, merge=0)`: forward FLOPs at the base patch relative to the full input."""
    from accelvit.budget import relative_cost
    from accelvit.build import recipe_shape
    from accelvit.setting import Setting

    shape, base = recipe_shape(cfg), cfg.model.patch_size
    return lambda keep=1.0, merge=0.0: relative_cost(shape, Setting(keep, base, merge), base)


def matching_merge(cost: Callable[..., float], target: float, keep: float = 1.0) -> float:
    """The merge fraction (a multiple of 0.005) whose relative forward FLOPs at `keep` are closest to
    `target`. Merging cannot go below a floor: the first block's attention sees every token."""
    return min((i / 200 for i in range(101)), key=lambda m: abs(cost(keep, m) - target))


def curricula(cfg) -> dict[str, list[str]]:
    """Schedules (as --set overrides) starting at keep 0.25's FLOPs, each at full input from 0.75 on."""
    base, cost = cfg.model.patch_size, relative_flops(cfg)
    m = matching_merge(cost, cost(keep=0.25))
    ramp = "{shape: step, points: [[0.0, %g], [0.25, %g], [0.5, %g], [0.75, %g]]}"
    return {
        "baseline": [],
        "dropout": ["schedule.keep=" + ramp % (0.25, 0.5, 0.75, 1.0)],
        "patch": [f"schedule.patch={{shape: step, points: [[0.0, {2 * base}], [0.75, {base}]]}}"],
        "merge": ["schedule.merge=" + ramp % (m, round(m * 2 / 3, 3), round(m / 3, 3), 0.0)],
    }


def equal_cost_strategies(cfg) -> str:
    """At keep 0.5's FLOPs: dropout and merging alone. At keep 0.25's: dropout, 2x patch, and keep 0.5
    with merging (merging alone cannot get that cheap on a shallow model)."""
    base, cost = cfg.model.patch_size, relative_flops(cfg)
    half = matching_merge(cost, cost(keep=0.5))
    quarter = matching_merge(cost, cost(keep=0.25), keep=0.5)
    return f"0.5:{base},1:{base}:{half:g},0.25:{base},1:{2 * base},0.5:{base}:{quarter:g}"


def main(argv: list[str] | None = None) -> dict:
    from accelvit.cli import main as cli
    from accelvit.config import load_config
    from accelvit.report import GRAD_COLUMNS, plot_diagnostics

    args = parse_args(argv)
    common = [*BUDGETED_RUN, *STUDY]
    common += SMOKE if args.smoke else ([] if args.full else QUICK)
    steps = args.budget_steps or (4 if args.smoke else 300)
    budget = steps * full_step_units(RECIPE, common)
    common += [f"train.budget={budget}", f"train.diagnostics_every={max(1, steps // 15)}"]
    cfg = load_config(RECIPE, common, check_paths=False)
    out = Path(args.output) if args.output else RESULTS / "compression_study-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    rows, diagnostics = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, schedule in curricula(cfg).items():
            run_dir = Path(tmp) / name
            run = train_and_eval(RECIPE, [*common, *schedule], run_dir)
            rows.append({"run": name, "schedule": schedule, "budget": budget, **run})
            print(
                f"{name:>8}: {run['steps']:5d} steps, {run['wall_s']:6.1f} s, kNN top-1 {run['knn_top1']:.4f}"
            )
            lines = (run_dir / "diagnostics.jsonl").read_text().splitlines()
            diagnostics[name] = [json.loads(line) for line in lines]

        report_path = out.with_name(out.stem + "-grad_error.json")
        strategies = equal_cost_strategies(cfg)
        baseline = str(Path(tmp) / "baseline")
        argv = ["grad-error", baseline, "--strategies", strategies, "--batches", str(args.batches)]
        if cli([*argv, "-o", str(report_path)]) != 0:
            raise SystemExit("grad-error failed")
    report = json.loads(report_path.read_text())
    figure = plot_diagnostics(
        {k: diagnostics[k] for k in ("baseline", "dropout", "merge")},
        out.with_name(out.stem + "-entropy.png"),
    )
    print(format_table(rows, report))
    result = {
        "dataset": "synthetic" if args.smoke else "fashion-mnist",
        "size": "smoke" if args.smoke else ("full" if args.full else "quick"),
        "overrides": common,
        "budget_steps": steps,
        "runs": rows,
        "grad_error": {
            "report": report_path.name,
            "strategies": [{k: r.get(k) for k in GRAD_COLUMNS} for r in report["strategies"]],
        },
        "entropy_figure": figure.name,
        "final_entropy": {k: [b["entropy"] for b in v[-1]["blocks"]] for k, v in diagnostics.items()},
        "entropy_curves": {
            k: [[d["progress"], [b["entropy"] for b in d["blocks"]]] for d in v]
            for k, v in diagnostics.items()
        },
    }
    return write_result("compression_study", result, str(out))


def format_table(rows: list[dict], report: dict) -> str:
    from accelvit.setting import setting_of

    lines = ["| run | steps | wall s | kNN top-1 |", "|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['steps']} | {r['wall_s']:.0f} | {r['knn_top1']:.4f} |" for r in rows]
    lines += [
        "",
        "| strategy | FLOPs | bias² | relative bias | cosine | CA-MSE |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["strategies"]:
        lines.append(
            f"| {setting_of(r).label} | {r['flops']:.3f} | {r['bias_sq']:.3g} | {_fmt(r['relative_bias'])} "
            f"| {_fmt(r['cosine'])} | {r['ca_mse']:.3g} |"
        )
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()
