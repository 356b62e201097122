"""Time to accuracy on Fashion-MNIST: the accelerated recipe against its trained baseline.

For SimCLR, MoCo-v3 and DINO it trains `recipes/OBJ-fmnist-baseline.yaml` for its budget B (the
recipe's steps, a trained accuracy: see benchmarks/learning) and `recipes/OBJ-fmnist-accel.yaml` at
B/8, B/4, B/2 and B, scores every run by kNN top-1 and a linear probe, and reports the speedup: B
over the smallest accelerated budget whose accuracy reaches the baseline's at B, interpolated in log
budget between the measured budgets, in budget units and in training wall clock (the reference's
ImageNet figures: 4x MoCo-v3, 3.3x SimCLR, 2.5x DINO). A second seed of the baseline at B and of the
accelerated run at the budget that matches it gives the noise floor the ratios must be read against.

Each run is an accelvit run directory under `--runs` (shared with benchmarks/learning): finished
runs are reused, unfinished ones resumed, and rows are written as they come; `--no-train` scores the
finished ones while others train elsewhere (the summary then says `partial`). The baseline's wall clock
alone is timed once and kept; `--retime` (alone on the machine) adds a timing, and the median is used.

    python -m benchmarks.time_to_accuracy --objectives mocov3   # one objective (1 to 2 hours on 2 CPU cores)
    python -m benchmarks.time_to_accuracy --gpu                 # batch 256, bf16, full splits, on one GPU
    python -m benchmarks.time_to_accuracy --smoke               # synthetic data, seconds
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also run as `python benchmarks/NAME.py`
from benchmarks.common import (  # noqa: E402
    REPO,
    RESULTS,
    SMOKE_SCORED,
    device,
    untrained_knn,
    write_result,
)
from benchmarks.runs import alone_minutes, cached_rows, earlier_result, other_objectives, scored_run  # noqa: E402

FRACTIONS = (0.125, 0.25, 0.5, 1.0)
GPU = [
    "train.batch_size=256",
    "train.precision=bf16",
    "data.workers=8",
    "eval.train_limit=null",
    "eval.test_limit=null",
    "train.eval_every=null",  # in-loop kNN on the full splits: 10 to 15 s each on an H200; scored at the end
]
SMOKE = [*SMOKE_SCORED, "train.steps=8", "train.checkpoint_every=4", "train.eval_every=null"]
SMOKE += ["eval.linear_epochs=2"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--objectives", default="simclr,mocov3,dino")
    p.add_argument("--seeds", default="0,1", help="seeds; the second and later only at the matched budget")
    p.add_argument("--runs", default=str(REPO / "runs" / "learning"), help="folder of the run directories")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--gpu", action="store_true", help="a size for one GPU (runs anywhere, slowly)")
    size.add_argument("--smoke", action="store_true")
    p.add_argument("--no-train", action="store_true", help="score finished runs only; train nothing")
    retime = "time the baseline alone once more, kept beside the earlier timings (run it alone)"
    p.add_argument("--retime", action="store_true", help=retime)
    p.add_argument("-o", "--output", default=None)
    return p.parse_args(argv)


def full_step_units(recipe: Path, overrides: list[str]) -> float:
    """Budget units of one uncompressed step of `recipe` (per image x batch)."""
    from accelvit.build import flops_cost
    from accelvit.config import load_config
    from accelvit.setting import Setting

    cfg = load_config(recipe, [*overrides, "train.steps=null", "train.budget=1"], check_paths=False)
    return flops_cost(cfg)(Setting(1.0, cfg.model.patch_size)) * cfg.train.batch_size


def crossing(points: list[tuple[float, float]], target: float) -> float | None:
    """The smallest x at which y reaches `target`, interpolated in log x between measured points
    (x ascending); None when no point reaches it."""
    for i, (x, y) in enumerate(points):
        if y >= target:
            if i == 0:
                return x
            x0, y0 = points[i - 1]
            t = (target - y0) / (y - y0)
            return math.exp(math.log(x0) + t * (math.log(x) - math.log(x0)))
    return None


def interpolate_log(points: list[tuple[float, float]], x: float) -> float:
    """y at x, linear in log x between the measured points (x ascending)."""
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= x <= x1:
            t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    return points[0][1] if x < points[0][0] else points[-1][1]


def baseline_timings(summary: dict, run_recipe: str) -> list[float]:
    """The baseline's earlier alone timings, if they timed the recipe of the run scored now."""
    if summary.get("baseline_run_recipe") != run_recipe:
        return []
    return list(summary.get("baseline_alone_timings", []))


def speedup(rows: list[dict], metric: str, baseline_minutes: float) -> dict:
    """B over the smallest accelerated budget reaching the seed-0 baseline's `metric` at B; in wall
    clock, `baseline_minutes` (the baseline timed alone) over the accelerated minutes interpolated there."""
    baseline = next(r for r in rows if r["recipe"] == "baseline" and r["seed"] == rows[0]["seed"])
    accel = sorted((r for r in rows if r["recipe"] == "accel" and r["seed"] == baseline["seed"]),
                   key=lambda r: r["budget"])  # fmt: skip
    points = [(r["budget"], r[metric]) for r in accel]
    reached = crossing(points, baseline[metric])
    if reached is None:
        return {"target": baseline[metric], "reached": False, "best_accel": max(y for _, y in points)}
    wall = interpolate_log([(r["budget"], r["minutes"]) for r in accel], reached)
    return {
        "target": baseline[metric],
        "reached": True,
        "budget": reached,
        "speedup_budget": baseline["budget"] / reached,
        "speedup_wall": baseline_minutes / wall if wall > 0 else None,  # smoke runs round to 0 minutes
    }


def main(argv: list[str] | None = None) -> dict:
    from accelvit.config import load_config

    args = parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    size = "smoke" if args.smoke else "gpu" if args.gpu else "cpu"
    common = {"smoke": SMOKE, "gpu": GPU, "cpu": []}[size]
    runs = Path(args.runs) / ("" if size == "cpu" else size)
    name = "time_to_accuracy" + ("" if size == "cpu" else f"-{size}")
    out = args.output or str(RESULTS / f"{name}-{device().type}.json")
    names, earlier = args.objectives.split(","), earlier_result(out)
    earlier_summary = earlier.get("summary", {})
    cache = cached_rows(earlier)
    rows = other_objectives(earlier, "rows", names)
    # an objective's earlier summary, with the alone timings it keeps, stays until its own is
    # recomputed: a sitting stopped midway (rows are written as they come) must not lose them
    summary = dict(earlier_summary)

    def measure(name: str, kind: str, fraction: float, seed: int, budget_units: float) -> dict | None:
        recipe = REPO / f"recipes/{name}-fmnist-{kind}.yaml"
        overrides = [*common, f"train.seed={seed}"]
        if kind == "accel":
            overrides += ["train.steps=null", f"train.budget={fraction * budget_units}"]
        label = "baseline" if kind == "baseline" else f"accel-{fraction:g}"
        run_dir = runs / f"{name}-{label}-seed{seed}"
        fields = {
            "objective": name,
            "recipe": kind,
            "fraction": fraction,
            "seed": seed,
            "budget": fraction * budget_units,
        }
        row = scored_run(recipe, overrides, run_dir, cache, fields, train=not args.no_train)
        if row is None:
            print(f"{name:>7} {kind:>8} {fraction:5.3f} B seed {seed}: {run_dir} is not finished; not scored")
            return None
        step = row["step"]
        rows.append(row)
        print(f"{name:>7} {kind:>8} {fraction:5.3f} B seed {seed} ({step} steps, {row['minutes']:.1f} min): "
              f"kNN {row['knn_top1']:.4f}, linear {row['linear_top1']:.4f}", flush=True)  # fmt: skip
        _write(rows, summary, out, runs, size)
        return row

    for name in names:
        baseline_recipe = REPO / f"recipes/{name}-fmnist-baseline.yaml"
        cfg = load_config(baseline_recipe, common)
        units = cfg.train.steps * full_step_units(baseline_recipe, common)
        base = measure(name, "baseline", 1.0, seeds[0], units)
        accel = [measure(name, "accel", fraction, seeds[0], units) for fraction in FRACTIONS]
        if base is None or not any(accel):  # --no-train before these runs finished: nothing to compare
            continue
        mine = [r for r in rows if r["objective"] == name]
        # the baseline's wall clock alone: its run shared the cores with others (the accelerated runs'
        # minutes are their own: train those alone). Timed once and kept: a timing moves with the
        # machine's load (31 to 37 minutes for SimCLR), so each --retime adds one and the median is used
        timings = baseline_timings(earlier_summary.get(name, {}), base["run_recipe"])
        if args.retime or not timings:
            timings.append(alone_minutes(baseline_recipe, common, *((6, 2) if size == "smoke" else ())))
        alone = statistics.median(timings)
        knn = speedup(mine, "knn_top1", alone)
        # the second seed: the baseline at B, and the accelerated run at the budget that matches it
        matched = min((f for f in FRACTIONS if f * units >= knn.get("budget", units) - 1e-6), default=1.0)
        second = [measure(name, kind, f, seed, units) for seed in seeds[1:] for kind, f in
                  (("baseline", 1.0), ("accel", matched))]  # fmt: skip
        mine = [r for r in rows if r["objective"] == name]
        summary[name] = {
            "partial": None in accel + second,  # --no-train while some runs still train
            "baseline_knn": base["knn_top1"],
            "baseline_linear": base["linear_top1"],
            "untrained_knn": untrained_knn(baseline_recipe, common),
            "knn": knn,
            "linear": speedup(mine, "linear_top1", alone),
            "baseline_minutes_alone": alone,
            "baseline_alone_timings": timings,
            "baseline_run_recipe": base["run_recipe"],
            "speedup_budget": knn.get("speedup_budget"),
            "speedup_wall": knn.get("speedup_wall"),
            "matched_fraction": matched,
            "seeds": {
                kind: {r["seed"]: r["knn_top1"] for r in mine if r["recipe"] == kind and r["fraction"] == f}
                for kind, f in (("baseline", 1.0), ("accel", matched))
            },
        }
        _write(rows, summary, out, runs, size)
    print(format_table(rows, summary))
    plot(rows, summary, Path(out).with_suffix(".png"))
    return _write(rows, summary, out, runs, size)


def _write(rows: list[dict], summary: dict, out: str, runs: Path, size: str) -> dict:
    result = {"size": size, "fractions": FRACTIONS, "runs": str(runs), "rows": rows, "summary": summary}
    return write_result("time_to_accuracy", result, out)


def format_table(rows: list[dict], summary: dict) -> str:
    lines = [
        "| objective | run | budget | seed | steps | minutes | kNN top-1 | linear top-1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['objective']} | {r['recipe']} | {r['fraction']:g} B | {r['seed']} | {r['step']} "
            f"| {r['minutes']:.1f} | {r['knn_top1']:.4f} | {r['linear_top1']:.4f} |"
        )
    lines.append("")
    for name, s in summary.items():
        for metric in ("knn", "linear"):
            m = s[metric]
            if m["reached"]:
                wall = "no" if m["speedup_wall"] is None else f"{m['speedup_wall']:.2f}x"
                lines.append(
                    f"{name} ({metric}): the accelerated recipe reaches the baseline's {m['target']:.4f} at "
                    f"{m['speedup_budget']:.2f}x less budget, {wall} less wall clock"
                )
            else:
                best, target = m["best_accel"], m["target"]
                lines.append(f"{name} ({metric}): not reached ({best:.4f} against {target:.4f})")
        seeds = ", ".join(f"{k} {sorted(v.values())}" for k, v in s["seeds"].items())
        lines.append(f"{name}: untrained {s['untrained_knn']:.4f}; seeds: {seeds}")
    return "\n".join(lines)


def plot(rows: list[dict], summary: dict, path: Path) -> None:
    """Accuracy against budget (log x), one line per run kind, the baseline's level drawn across."""
    from accelvit.report import pyplot, save_figure

    plt = pyplot()

    names = list(summary)
    fig, axes = plt.subplots(1, len(names), figsize=(4.4 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        mine = [r for r in rows if r["objective"] == name]
        for metric, style in (("knn_top1", "-"), ("linear_top1", "--")):
            first = [r for r in mine if r["recipe"] == "accel" and r["seed"] == mine[0]["seed"]]
            accel = sorted((r["fraction"], r[metric]) for r in first)
            ax.plot(*zip(*accel, strict=True), style, marker="o", label=f"accel {metric.split('_')[0]}")
            base = [r[metric] for r in mine if r["recipe"] == "baseline"]
            ax.scatter([1.0] * len(base), base, marker="s", color="black")
            ax.axhline(base[0], color="grey", linestyle=style, linewidth=0.8)
        ax.axhline(summary[name]["untrained_knn"], color="grey", linestyle=":", label="untrained kNN")
        ax.set_xscale("log", base=2)
        ax.set(title=name, xlabel="budget (fraction of the baseline's B)", ylabel="top-1")
        ax.legend(fontsize=7)
    print(f"wrote {save_figure(fig, path)}")


if __name__ == "__main__":
    main()
