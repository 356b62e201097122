"""Time to accuracy curve to curve: the accelerated recipe's frontier against the baseline's.

For each objective the uncompressed baseline is trained with its own full schedule (warm-up, decay,
momentum and teacher schedules all end at the run's end) at B/4, B/2, B and 2B, and the accelerated
recipe at B/8, B/4, B/2 and B (B: the baseline recipe's steps in budget units). Every run is scored
on the full splits (kNN over the 60,000 training images, tested on the 10,000 test images; a linear
probe on all training features), each figure with its binomial standard error, beside raw pixels and
the untrained backbone scored the same way.

The speedup of an accelerated point is the baseline budget that reaches its accuracy, interpolated
in log budget between the two frontier points that bracket it, over its own budget; above the whole
frontier it is a lower bound (`bracketed: false`). The headline per objective and metric is the
largest ratio among accelerated points within one standard error of the best baseline.

The headline budget counts every cost: each step costs what it takes on this machine alone, per
setting (`--time`: heads, losses, the teacher, local crops, view generation and the optimizer
included), in FLOPs units for an uncompressed step (`budget_measured` in a row, `budget` in a
speedup). Wall-clock minutes are those timings times the steps a run took at each setting, so no
ratio depends on what else shared the cores while a run trained, and the budget ratio is the wall
ratio of runs alone. The recipes' analytic cost model (the encoder passes only, `budget` in a row,
`budget_flops` in a speedup) is reported beside it: it leaves out what compression does not shrink.

Runs are accelvit run directories under `--runs`: finished ones reused, unfinished ones resumed. A
scored run's row is kept in the JSON keyed by its resolved recipe, so it is not trained again even
where its run directory is gone. Lanes (`--objectives`, `--kinds`, `--fractions`) can run side by
side: each merges its rows into the JSON under a lock.

    python -m benchmarks.time_to_accuracy_curves --objectives simclr --kinds baseline   # hours on 2 cores
    python -m benchmarks.time_to_accuracy_curves --time       # alone: per-setting step timings, summary
    python -m benchmarks.time_to_accuracy_curves --smoke      # synthetic data, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import statistics
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also run as `python benchmarks/NAME.py`
from accelvit.backbone import build_backbone  # noqa: E402
from accelvit.budget import simulate, table_cost_fn  # noqa: E402
from accelvit.build import flops_cost, recipe_shape  # noqa: E402
from accelvit.checkpoint import RECIPE  # noqa: E402
from accelvit.config import Config, load_config  # noqa: E402
from accelvit.evaluate import (  # noqa: E402
    evaluate_backbone,
    evaluate_run,
    extract_features,
    knn_top1,
    labelled_splits,
    linear_probe_top1,
)
from accelvit.setting import Setting  # noqa: E402
from benchmarks.common import REPO, RESULTS, SMOKE_SCORED, device, write_result
from benchmarks.runs import final_step, median_step_seconds, recipe_digest, recipe_key, train_run  # noqa: E402
from benchmarks.time_to_accuracy import crossing, full_step_units  # noqa: E402

FRACTIONS = {"baseline": (0.25, 0.5, 1.0, 2.0), "accel": (0.125, 0.25, 0.5, 1.0)}
FULL_SPLITS = ["eval.train_limit=null", "eval.test_limit=null"]
# the runs themselves: no in-loop kNN (every point is scored at its end on the full splits), and
# checkpoints often enough that a sitting's end costs little
TRAINING = ["train.eval_every=null", "train.checkpoint_every=250", "train.keep_checkpoints=2"]
SMOKE = [*SMOKE_SCORED, "train.checkpoint_every=4", "eval.linear_epochs=2"]
SMOKE_STEPS = 8
TIMED_STEPS, TIMED_WARMUP = 60, 15


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--objectives", default="simclr,mocov3,dino")
    p.add_argument("--kinds", default="baseline,accel", help="baseline, accel or both")
    p.add_argument("--fractions", help="budget fractions to train (default: each kind's frontier)")
    p.add_argument("--seeds", default="0")
    p.add_argument("--runs", default=str(REPO / "runs" / "curves"), help="folder of the run directories")
    p.add_argument("--smoke", action="store_true", help="synthetic data and tiny runs, seconds")
    p.add_argument("--no-train", action="store_true", help="score finished runs only; train nothing")
    p.add_argument("--time", action="store_true", help="time every setting of the scored runs alone")
    p.add_argument(
        "--rounds", type=int, default=3,
        help="--time: rounds over the settings (each a throwaway run per setting); the median is kept",
    )  # fmt: skip
    p.add_argument("--retime", action="store_true", help="--time: discard earlier timings, time all")
    p.add_argument("-o", "--output", default=None)
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds {args.rounds}: at least 1")
    return args


def recipe_of(name: str, kind: str) -> Path:
    return REPO / f"recipes/{name}-fmnist-{kind}.yaml"


def base_steps(name: str, common: list[str]) -> int:
    return SMOKE_STEPS if SMOKE[0] in common else load_config(recipe_of(name, "baseline"), common).train.steps


def run_overrides(name: str, kind: str, fraction: float, seed: int, common: list[str]) -> list[str]:
    """A frontier point: the baseline with its own schedule over `fraction` of its steps, or the
    accelerated recipe given `fraction` of the baseline's budget."""
    steps = base_steps(name, common)
    overrides = [*common, *TRAINING, f"train.seed={seed}"]
    if kind == "baseline":
        return [*overrides, f"train.steps={max(1, round(fraction * steps))}"]
    units = full_step_units(recipe_of(name, "baseline"), common)
    return [*overrides, "train.steps=null", f"train.budget={fraction * steps * units}"]


def settings_taken(cfg: Config) -> Counter:
    """How many steps the run takes at each setting ("keep:patch:merge"), as the loop takes them."""
    shape = recipe_shape(cfg)
    return Counter(
        r.setting.label for r in simulate(cfg, shape, flops_cost(cfg, shape), cfg.train.batch_size)
    )


def timed_grid(labels: set[str]) -> list[Setting]:
    """The settings to time for `labels`: each (patch, merge) at its distinct keeps, or at five keeps
    spanning them where a ramp takes many (the cost is interpolated linearly in keep between them)."""
    by_group: dict[tuple[int, float], set[float]] = {}
    for label in labels:
        s = setting_of_label(label)
        by_group.setdefault((s.patch, s.merge), set()).add(s.keep)
    grid = []
    for (patch, merge), keeps in sorted(by_group.items()):
        lo, hi = min(keeps), max(keeps)
        chosen = sorted(keeps) if len(keeps) <= 5 else [lo + (hi - lo) * i / 4 for i in range(5)]
        grid += [Setting(round(k, 4), patch, merge) for k in chosen]
    return grid


def setting_of_label(label: str) -> Setting:
    keep, patch, *merge = label.split(":")
    return Setting(float(keep), int(patch), float(merge[0]) if merge else 0.0)


def score(run_dir: Path, fields: dict, cfg: Config, splits: list[str]) -> dict:
    """kNN and linear top-1 of a finished run on the splits `splits` selects, with standard errors."""
    result = evaluate_run(run_dir, linear=True, overrides=splits)
    n = result["test_size"]
    return {
        **fields,
        "step": final_step(run_dir),
        "knn": result["knn_top1"],
        "linear": result["linear_top1"],
        "knn_se": standard_error(result["knn_top1"], n),
        "linear_se": standard_error(result["linear_top1"], n),
        "test_size": n,
        "train_size": result["train_size"],
        "settings": dict(settings_taken(cfg)),
        "run_recipe": recipe_key(cfg),
    }


def standard_error(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n)


def references(name: str, common: list[str], splits: list[str]) -> dict:
    """Raw pixels and the untrained backbone (the baseline recipe's seed), scored as the runs are."""
    from accelerate.utils import set_seed

    cfg = load_config(recipe_of(name, "baseline"), [*common, *splits])
    cfg.eval.linear = True
    set_seed(cfg.train.seed)
    untrained = evaluate_backbone(build_backbone(cfg.model), cfg.model, cfg.data, cfg.eval, device())
    pixels = [
        extract_features(lambda x: x.flatten(1), s, cfg.model.image_size, cfg.eval.batch_size, device())
        for s in labelled_splits(cfg.data, cfg.eval)
    ]
    return {
        "pixels_knn": knn_top1(*pixels, cfg.eval.k, cfg.eval.temperature),
        "pixels_linear": linear_probe_top1(*pixels, cfg.eval.linear_epochs),
        "untrained_knn": untrained["knn_top1"],
        "untrained_linear": untrained["linear_top1"],
    }


def step_seconds(name: str, setting: Setting, common: list[str]) -> float:
    """Median seconds of a step (data included) of the baseline recipe held at one setting, in a
    throwaway run on this machine: every cost of a step, whatever the cost model counts. Run it alone."""
    fixed = [
        f"schedule.keep={setting.keep}",
        f"schedule.patch={setting.patch}",
        f"schedule.merge={setting.merge}",
        "schedule.mode=fixed",
    ]
    return median_step_seconds(recipe_of(name, "baseline"), [*common, *fixed], TIMED_STEPS, TIMED_WARMUP)


# ---- curve to curve ----


def bracketing(points: list[tuple[float, float]], target: float) -> tuple[float, bool] | None:
    """`crossing` (the smallest budget at which the frontier reaches `target`, interpolated in log
    budget) and whether two frontier points bracket it: at or below the first point it is that
    point's budget, an upper bound on the budget needed. None when the whole frontier stays below
    (the caller reports a lower bound)."""
    reached = crossing(points, target)
    return None if reached is None else (reached, reached > points[0][0])


def by_fraction(rows: list[dict], kind: str) -> dict[float, list[dict]]:
    """One kind's rows grouped by budget fraction (a point's seeds)."""
    groups: dict[float, list[dict]] = {}
    for r in rows:
        if r["kind"] == kind:
            groups.setdefault(r["fraction"], []).append(r)
    return groups


def seed_mean(rs: list[dict], metric: str, x: str) -> tuple[float, float]:
    """(budget, accuracy) of one point, averaged over its seeds."""
    return statistics.mean(r[x] for r in rs), statistics.mean(r[metric] for r in rs)


def frontier(rows: list[dict], kind: str, metric: str, x: str) -> list[tuple[float, float]]:
    """(budget, accuracy averaged over seeds) of one kind's points, budget ascending."""
    return sorted(seed_mean(rs, metric, x) for rs in by_fraction(rows, kind).values())


def speedups(rows: list[dict], metric: str, x: str) -> list[dict]:
    """Per accelerated point (its seeds' mean): the baseline budget that reaches its accuracy over
    its own budget."""
    base = frontier(rows, "baseline", metric, x)
    out = []
    for fraction, rs in sorted(by_fraction(rows, "accel").items()):
        budget, accuracy = seed_mean(rs, metric, x)
        point = {"fraction": fraction, "seeds": len(rs), "budget": budget, metric: accuracy}
        found = bracketing(base, accuracy)
        if found is None:  # above the whole frontier: at least the longest baseline's budget
            out.append({**point, "ratio": base[-1][0] / budget, "bracketed": False, "bound": "lower"})
            continue
        reached, bracketed = found
        out.append({**point, "ratio": reached / budget, "bracketed": bracketed,
                    "bound": None if bracketed else "upper"})  # fmt: skip
    return out


def headline(rows: list[dict], metric: str, x: str) -> dict | None:
    """The largest ratio among accelerated points within one standard error of the best baseline."""
    baselines = [r for r in rows if r["kind"] == "baseline"]
    if not baselines or not any(r["kind"] == "accel" for r in rows):
        return None
    best = max(frontier(rows, "baseline", metric, x), key=lambda p: p[1])
    se = statistics.mean(r[f"{metric}_se"] for r in baselines)
    points = speedups(rows, metric, x)
    near = [p for p in points if p[metric] >= best[1] - se]
    chosen = max(near, key=lambda p: p["ratio"]) if near else None
    return {
        "best_baseline": best[1],
        "best_baseline_budget": best[0],
        "se": se,
        "ratio": chosen["ratio"] if chosen else None,
        "bracketed": chosen["bracketed"] if chosen else False,
        "bound": chosen["bound"] if chosen else None,
        "points": points,
    }


def with_costs(rows: list[dict], timings: list[dict], full_units: float, full: Setting) -> None:
    """Add `budget_measured` (units: an uncompressed step keeps its FLOPs units, others cost their
    measured time relative to it) and `minutes` (alone timings x steps) to every row timed.
    `timings`: rows {keep, patch, merge, units: seconds a step}."""
    seconds = table_cost_fn(timings)
    for r in rows:
        try:
            s = sum(n * seconds(setting_of_label(label)) for label, n in r["settings"].items())
            unit = seconds(full)
        except (ValueError, StopIteration):  # a setting not timed yet
            continue
        r["minutes"] = s / 60
        r["budget_measured"] = s / unit * full_units


def summarize(
    name: str, rows: list[dict], refs: dict, timings: list, full_units: float, full: Setting
) -> dict:
    mine = [r for r in rows if r["objective"] == name]
    with_costs(mine, timings, full_units, full)
    summary = {
        **refs,
        "full": full.label,
        "full_step_units": full_units,
        "step_seconds": timings,
        "speedup": {},
    }
    timed = all("minutes" in r for r in mine)
    for metric in ("knn", "linear"):
        # the headline counts every cost of a step (timed alone); FLOPs count the encoder passes only
        measured = headline(mine, metric, "budget_measured") if timed else None
        flops = headline(mine, metric, "budget")
        wall = headline(mine, metric, "minutes") if timed else None
        summary["speedup"][metric] = {
            "budget": measured and measured["ratio"],
            "wall": wall and wall["ratio"],
            "budget_flops": flops and flops["ratio"],
            "bracketed": bool(measured and measured["bracketed"]),
            "bound": measured and measured["bound"],
            "bound_flops": flops and flops["bound"],
            "best_baseline": flops and flops["best_baseline"],
            "points": measured and measured["points"],
            "points_flops": flops and flops["points"],
        }
    return summary


# ---- the JSON, shared by lanes ----


@contextlib.contextmanager
def locked_result(out: Path):
    """The result so far, to update in place; written back when the block ends, under a lock so
    that lanes running side by side keep each other's rows."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = json.loads(out.read_text()) if out.is_file() else {}
        result.setdefault("rows", [])
        result.setdefault("objectives", {})
        yield result
        tmp = out.with_suffix(".tmp")
        write_result(
            "time_to_accuracy_curves", {k: v for k, v in result.items() if k != "benchmark"}, str(tmp)
        )
        tmp.replace(out)


REFERENCES = ("pixels_knn", "pixels_linear", "untrained_knn", "untrained_linear")


def scoring_splits(args) -> list[str]:
    """The full splits, except for the smoke size (its synthetic splits are the eval limits')."""
    return [] if args.smoke else FULL_SPLITS


def measure_point(name: str, kind: str, fraction: float, seed: int, args, done: set[str], out: Path) -> None:
    """Train one frontier point to its end (or reuse it) and merge its scored row into the JSON."""
    common = SMOKE if args.smoke else []
    overrides = run_overrides(name, kind, fraction, seed, common)
    cfg = load_config(recipe_of(name, kind), overrides)
    if recipe_key(cfg) in done:
        return
    run_dir = Path(args.runs) / ("smoke" if args.smoke else "") / f"{name}-{kind}-{fraction:g}B-seed{seed}"
    if not train_run(recipe_of(name, kind), overrides, run_dir, train=not args.no_train):
        print(f"{run_dir}: not finished; not scored", flush=True)
        return
    budget = fraction * base_steps(name, common) * full_step_units(recipe_of(name, "baseline"), common)
    fields = {"objective": name, "kind": kind, "fraction": fraction, "seed": seed, "budget": budget}
    row = score(run_dir, fields, cfg, scoring_splits(args))
    print(
        f"{name:>7} {kind:>8} {fraction:5.3f} B seed {seed} ({row['step']} steps): kNN {row['knn']:.4f} "
        f"± {row['knn_se']:.4f}, linear {row['linear']:.4f} ± {row['linear_se']:.4f}",
        flush=True,
    )
    with locked_result(out) as result:
        result["rows"] = [r for r in result["rows"] if r["run_recipe"] != row["run_recipe"]]
        result["rows"].append(row)
    done.add(row["run_recipe"])


def rekey(result: dict, runs: Path) -> None:
    """Key each row by its run directory's recipe as this accelvit reads it, and keep one row per
    run: a finished run is scored once, whatever the version that wrote its key."""
    kept = {}
    for r in result["rows"]:
        run_dir = runs / f"{r['objective']}-{r['kind']}-{r['fraction']:g}B-seed{r['seed']}"
        if (run_dir / RECIPE).is_file():
            r["run_recipe"] = recipe_digest(run_dir)
        kept.setdefault(r["run_recipe"], r)
    result["rows"] = list(kept.values())


def objective_summary(name: str, rows: list[dict], earlier: dict, args) -> dict:
    """References (computed once), alone timings (`--time`: the settings not timed yet) and speedups."""
    common = SMOKE if args.smoke else []
    base = load_config(recipe_of(name, "baseline"), common, check_paths=False)
    full = Setting(1.0, base.model.patch_size)
    refs = {k: earlier[k] for k in REFERENCES if k in earlier} or references(
        name, common, scoring_splits(args)
    )
    timings = [] if args.retime else list(earlier.get("step_seconds", []))
    if args.time:
        timed = {(t["keep"], t["patch"], t["merge"]) for t in timings}
        mine = [r for r in rows if r["objective"] == name]
        grid = timed_grid({label for r in mine for label in r["settings"]} | {full.label})
        todo = [s for s in grid if (s.keep, s.patch, s.merge) not in timed]
        # rounds over the settings, not repeats of one: a throwaway run's time drifts by several
        # percent from one run to the next, and a slow spell of the machine should not fall on one
        rounds = [[step_seconds(name, s, common) for s in todo] for _ in range(args.rounds)]
        for s, seconds in zip(todo, zip(*rounds, strict=True), strict=True):
            median = statistics.median(seconds)
            timings.append({"keep": s.keep, "patch": s.patch, "merge": s.merge, "units": median,
                            "rounds": list(seconds)})  # fmt: skip
    return summarize(name, rows, refs, timings, full_step_units(recipe_of(name, "baseline"), common), full)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    smoke = "smoke-" if args.smoke else ""
    out = Path(args.output or RESULTS / f"time_to_accuracy_curves-{smoke}{device().type}.json")
    names, kinds = args.objectives.split(","), args.kinds.split(",")
    with locked_result(out) as result:
        rekey(result, Path(args.runs) / ("smoke" if args.smoke else ""))
        done = {r["run_recipe"] for r in result["rows"]}
    for name in names:
        for kind in kinds:
            fractions = [float(f) for f in args.fractions.split(",")] if args.fractions else FRACTIONS[kind]
            for seed in (int(s) for s in args.seeds.split(",")):
                for fraction in fractions:
                    measure_point(name, kind, fraction, seed, args, done, out)

    # outside the lock (minutes of scoring and timing); the rows are re-read to merge under it
    with locked_result(out) as result:
        rows, objectives = list(result["rows"]), dict(result["objectives"])
    summaries = {
        name: objective_summary(name, rows, objectives.get(name, {}), args)
        for name in names
        if any(r["objective"] == name for r in rows)
    }
    with locked_result(out) as result:
        result["size"] = "smoke" if args.smoke else device().type
        for name, summary in summaries.items():  # rows other lanes added since are scored next time
            result["objectives"][name] = summary
            mine = [r for r in result["rows"] if r["objective"] == name]
            full = setting_of_label(summary["full"])
            with_costs(mine, summary["step_seconds"], summary["full_step_units"], full)
    # written first: minutes of timings are not lost to a table or a picture that fails
    print(format_table(result))
    plot_curves(result, out)
    return result


XLABELS = {
    "budget_measured": "budget, every cost timed alone (units of one full-input forward per image)",
    "budget": "budget in encoder FLOPs (units of one full-input forward per image)",
}


def plot_curves(result: dict, out: Path) -> list[Path]:
    """Accuracy against budget (log x), both frontiers, one picture per objective and metric: each
    seed's point, the seed mean joined by a line, one standard error as a bar."""
    from accelvit.report import pyplot, save_figure

    plt, paths = pyplot(), []
    for name in sorted({r["objective"] for r in result["rows"]}):
        mine = [r for r in result["rows"] if r["objective"] == name]
        x = "budget_measured" if all("budget_measured" in r for r in mine) else "budget"
        for metric in ("knn", "linear"):
            fig, ax = plt.subplots(figsize=(6, 4))
            for kind, colour in (("baseline", "tab:gray"), ("accel", "tab:blue")):
                points = [r for r in mine if r["kind"] == kind]
                if not points:
                    continue
                budgets, values = [r[x] for r in points], [r[metric] for r in points]
                errors = [r[f"{metric}_se"] for r in points]
                ax.errorbar(budgets, values, yerr=errors, fmt="o", color=colour, alpha=0.6)
                line = frontier(points, kind, metric, x)
                ax.plot(*zip(*line, strict=True), "-", color=colour, label=kind)
            summary = result["objectives"].get(name, {})
            if f"pixels_{metric}" in summary:
                ax.axhline(summary[f"pixels_{metric}"], color="tab:red", ls=":", label="raw pixels")
            ax.set_xscale("log")
            ax.set_xlabel(XLABELS[x])
            ax.set_ylabel(f"{metric} top-1 (full splits)")
            ax.set_title(f"{name}: {metric}")
            ax.legend()
            paths.append(save_figure(fig, out.with_name(f"{out.stem}-{name}-{metric}.png")))
    return paths


def format_table(result: dict) -> str:
    lines = [
        "| objective | kind | budget | seed | steps | minutes | kNN top-1 | linear top-1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(result["rows"], key=lambda r: (r["objective"], r["kind"], r["fraction"], r["seed"])):
        minutes = f"{r['minutes']:.1f}" if "minutes" in r else "-"
        lines.append(
            f"| {r['objective']} | {r['kind']} | {r['fraction']:g} B | {r['seed']} | {r['step']} | {minutes} "
            f"| {r['knn']:.4f} ± {r['knn_se']:.4f} | {r['linear']:.4f} ± {r['linear_se']:.4f} |"
        )
    for name, s in result["objectives"].items():
        lines.append(f"\n{name}: raw pixels kNN {s['pixels_knn']:.4f} / linear {s['pixels_linear']:.4f}; "
                     f"untrained kNN {s['untrained_knn']:.4f}")  # fmt: skip
        scored = any(r["objective"] == name and r["kind"] == "accel" for r in result["rows"])
        for metric, sp in s["speedup"].items():
            flops = f"{sp['budget_flops']:.2f}x in encoder FLOPs" if sp.get("budget_flops") else ""
            if not flops:
                why = "within one SE of the best baseline" if scored else "scored yet"
                lines.append(f"{name} ({metric}): no accelerated point {why}")
            elif sp["budget"] is None:
                lines.append(f"{name} ({metric}): not timed yet (`--time`); {flops}")
            else:
                bound = BOUNDS.get(sp["bound"], "")
                lines.append(f"{name} ({metric}): {sp['budget']:.2f}x in budget{bound} (every cost), {flops}")
    return "\n".join(lines) + "\n\n" + headline_table(result)


NAMES = {"simclr": "SimCLR", "mocov3": "MoCo-v3", "dino": "DINO"}
TARGETS = {"simclr": 3.3, "mocov3": 4.0, "dino": 2.5}  # the reference's ImageNet speedups
BOUNDS = {"lower": " (at least)", "upper": " (at most)"}


def headline_table(result: dict) -> str:
    """The README's table: per objective and metric, the headline speedup in a budget that counts
    every cost of a step (timed alone: the wall clock of a run alone) and in encoder FLOPs, the best
    baseline and the accelerated point it rests on (the mean of its seeds)."""
    lines = [
        "| objective | metric | budget, every cost (= wall alone) | encoder FLOPs | best baseline "
        "| accelerated point | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, summary in result["objectives"].items():
        rows = [r for r in result["rows"] if r["objective"] == name]
        unit = base_budget(rows)
        for metric, label in (("knn", "kNN"), ("linear", "linear probe")):
            sp = summary["speedup"][metric]
            if sp["budget"] is None:
                continue
            point = next(p for p in sp["points"] if (p["ratio"], p["bound"]) == (sp["budget"], sp["bound"]))
            base = max(frontier(rows, "baseline", metric, "budget"), key=lambda p: p[1])
            n = f"{point['seeds']} seed{'s' * (point['seeds'] > 1)}"
            at = f"{point[metric]:.4f} ({point['fraction']:g} B, {n})"
            lines.append(
                f"| {NAMES[name]} | {label} | **{sp['budget']:.2f}x**{BOUNDS.get(sp['bound'], '')} "
                f"| {sp['budget_flops']:.2f}x{BOUNDS.get(sp['bound_flops'], '')} "
                f"| {base[1]:.4f} ({base[0] / unit:g} B) | {at} | {TARGETS[name]}x |"
            )
    return "\n".join(lines)


def base_budget(rows: list[dict]) -> float:
    """B: the budget of the baseline at fraction 1."""
    return next(r["budget"] / r["fraction"] for r in rows if r["kind"] == "baseline")


if __name__ == "__main__":
    main()
