"""The schedule families side by side, at one budget and on one model.

For each objective (SimCLR first), at `--fraction` of the baseline recipe's budget B:
- uncompressed: the baseline recipe;
- curriculum: the accelerated recipe's hand-made schedule;
- constant: one setting for the whole run whose step costs the curriculum's mean (the reference
  finds constant compression plateaus): token dropout at the base patch, or, where dropping down to
  the lowest keep the schedules use is still dearer (MoCo-v3's keys see every token), twice the base
  patch at the keep that costs the mean, or all tokens if even that is cheaper;
- random: a patch size drawn per step from {base, 2 x base}, weighted to the curriculum's mean cost
  (FlexiViT's sampling, the peer baseline a schedule has to beat);
- plan: `accelvit plan` (FLOPs cost) from grad-error reports at 0, 1/4, 1/2 and 3/4 of a short
  uncompressed run of a quarter of the budget;
- plan-groups: the same reports planned with `--metric groups` (each parameter group's CA-MSE in units
  of its own noise, so that the patch embedding's large raw gradients do not decide alone);
- plan-trained, plan-trained-groups: both metrics from reports (K = 16) along an uncompressed run of
  the whole budget, so that each stage is chosen on a model trained as far as the planned run will be
  there (the short run's models are 4x less trained; its plans flipped with the seed);
- adaptive: `schedule.mode: adaptive`, the same candidates measured by the run itself;
- adaptive-groups: the same with `schedule.adaptive_metric: groups`;
- descent-plan, descent-adaptive: the descent criterion (expected loss decrease of an AdamW step per
  unit cost, `accelvit plan --metric descent`), planned from the whole-budget run's reports and
  measured by the run itself;
- lookahead-adaptive: `schedule.adaptive_metric: lookahead`, each stage trains every allowed candidate
  for the same budget from the run's state and keeps the one whose held-out full-input loss fell most
  (4 full-input steps' worth each, 4 held-out batches: about the descent-adaptive run's overhead);
- lookahead-settled-adaptive: the same read over 4 steps' worth after 4 steps' worth of settling
  (`schedule.lookahead_settle: 0.5`), so a switch's transient does not decide the stage (twice the
  training of lookahead-adaptive's stages).
Every run is scored on the full splits (kNN over the 60,000 training images tested on the 10,000
test images, and a linear probe), each figure with its standard error.
Every run is scored by kNN top-1 and a linear probe; the table gives training minutes, steps and what
the estimator cost (plan: the short run and its reports; adaptive: the budget its stages took).

    python -m benchmarks.schedule_families --objectives simclr    # 1 to 2 hours on 2 CPU cores
    python -m benchmarks.schedule_families --objectives simclr --seed 1   # another seed, same JSON
    python -m benchmarks.schedule_families --smoke                # synthetic data, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also run as `python benchmarks/NAME.py`
from benchmarks.common import REPO, RESULTS, device, write_result  # noqa: E402
from benchmarks.runs import (  # noqa: E402
    cached_rows,
    earlier_result,
    recipe_key,
    scored_run,
    train_run,
    training_minutes,
)
from benchmarks.time_to_accuracy import GPU, SMOKE, full_step_units  # noqa: E402
from benchmarks.time_to_accuracy_curves import TRAINING  # noqa: E402

FAMILIES = (
    "uncompressed", "curriculum", "constant", "random", "plan", "plan-groups", "plan-trained",
    "plan-trained-groups", "adaptive", "adaptive-groups", "descent-plan", "descent-adaptive",
    "lookahead-adaptive", "lookahead-settled-adaptive",
)  # fmt: skip
LOOKAHEAD = {
    "lookahead-adaptive": ["schedule.lookahead_steps=4", "schedule.adaptive_batches=4"],  # ~10% of B/4
    "lookahead-settled-adaptive": [
        "schedule.lookahead_steps=8", "schedule.lookahead_settle=0.5", "schedule.adaptive_batches=4"
    ],
}  # fmt: skip
FULL_SPLITS = ["eval.train_limit=null", "eval.test_limit=null"]
STAGES = (0.0, 0.25, 0.5, 0.75)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--objectives", default="simclr,mocov3")
    p.add_argument("--fraction", type=float, default=0.5, help="budget as a fraction of the baseline's B")
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--seed", type=int, default=0, help="training seed; its rows join the others' in the JSON")
    p.add_argument("--runs", default=str(REPO / "runs" / "families"), help="folder of the run directories")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--gpu", action="store_true")
    size.add_argument("--smoke", action="store_true")
    p.add_argument("-o", "--output", default=None)
    p.add_argument(
        "--curves",
        default=str(RESULTS / "time_to_accuracy_curves-cpu.json"),
        help="time_to_accuracy_curves results whose frontier points stand for the same runs here ('': none)",
    )
    return p.parse_args(argv)


def step_cost_fn(recipe: Path, overrides: list[str]):
    """Setting -> step cost relative to the uncompressed step of the recipe's objective (FLOPs)."""
    from accelvit.build import flops_cost
    from accelvit.config import load_config
    from accelvit.setting import Setting

    cfg = load_config(recipe, overrides, check_paths=False)
    cost = flops_cost(cfg)
    full = cost(Setting(1.0, cfg.model.patch_size))
    return lambda s: cost(s) / full


def curriculum_mean_cost(recipe: Path, overrides: list[str]) -> float:
    """The mean relative cost of the recipe's steps: at equal budget, a schedule whose steps cost this on
    average takes as many steps."""
    from accelvit.budget import mean_cost, simulate
    from accelvit.build import flops_cost, recipe_shape
    from accelvit.config import load_config

    cfg = load_config(recipe, overrides, check_paths=False)
    shape = recipe_shape(cfg)
    return mean_cost(simulate(cfg, shape, flops_cost(cfg, shape), cfg.train.batch_size))


MIN_KEEP = 0.25  # the lowest keep of the curriculum and the plan's candidates: below it, dropout degenerates


def constant_setting(cost, base: int, target: float):
    """The constant setting whose step costs `target` of the full step (bisection on keep): at the base
    patch while a keep of at least MIN_KEEP gets there, else at twice the base patch."""
    from accelvit.setting import Setting

    patch = base if cost(Setting(MIN_KEEP, base)) <= target else 2 * base
    if cost(Setting(1.0, patch)) <= target:
        return Setting(1.0, patch)
    lo, hi = 0.01, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(Setting(mid, patch)) < target else (lo, mid)
    return Setting(round((lo + hi) / 2, 4), patch)


def random_weights(cost, base: int, target: float) -> list[float]:
    """Weights of patch (base, 2 x base) whose expected step cost is `target`: p c_2x + (1 - p) = target."""
    from accelvit.setting import Setting

    big = cost(Setting(1.0, 2 * base))
    p = (1 - target) / (1 - big)
    p = min(max(p, 0.0), 1.0)
    return [round(1 - p, 4), round(p, 4)]


def plan_schedule(
    recipe: Path,
    overrides: list[str],
    budget: float,
    runs: Path,
    name: str,
    seed: int = 0,
    metric: str = "model",
    trained: bool = False,
) -> tuple[Path, float, str]:
    """Grad-error reports of an uncompressed run -> `accelvit plan` -> a schedule file; its cost in
    minutes (the run's training and its reports) and its stages ("1:8 from 0, 1:4 from 0.75"). The run
    is a short one of a quarter of the budget, or (`trained`) one of the whole budget with K = 16."""
    from accelvit.checkpoint import GRAD_ERROR
    from accelvit.gradbias import SCHEMA
    from accelvit.plan import plan, schedule_from_plan, write_schedule
    from accelvit.report import load_grad_report

    kind = "plan-trained" if trained else "plan"
    source = runs / f"{name}-{kind}-source{_seed_suffix(seed)}"
    base = _base_patch(recipe, overrides)
    strategies = _candidates(base)
    reports_at = [
        "train.steps=null",
        f"train.budget={budget if trained else budget / 4}",
        f"train.grad_error_at={list(STAGES)}",
        f"train.grad_error_strategies={strategies}",
        # the whole-budget run skips the recipe's in-loop kNN evaluations (minutes the plan does not
        # use); the short run keeps the recipe it was measured with, so its finished runs are reused
        *(["train.grad_error_batches=16", "train.eval_every=null"] if trained else []),
    ]
    train_run(recipe, [*overrides, *reports_at], source)
    paths = sorted((source / GRAD_ERROR).glob("step_*.json"), key=lambda p: int(p.stem.split("_")[1]))
    reports = [load_grad_report(p, SCHEMA) for p in paths]
    out = runs / f"{name}-{kind}{'' if metric == 'model' else '-' + metric}{_seed_suffix(seed)}.yaml"
    stages = plan(reports, base, "flops", metric)
    write_schedule(out, schedule_from_plan(stages), [p.name for p in paths])
    minutes = training_minutes(source) + sum(r["wall_s"] for r in reports) / 60
    return out, minutes, ", ".join(f"{c.setting.label} from {p:g}" for p, c in stages)


def _candidates(base: int) -> str:
    """The compressed settings the plan's reports and the adaptive stages both choose among."""
    return f"0.5:{base},0.25:{base},1:{2 * base},0.5:{2 * base},0.25:{2 * base}"


def _seed_suffix(seed: int) -> str:
    return f"-seed{seed}" if seed else ""  # seed 0 keeps the names its finished runs have


def _base_patch(recipe: Path, overrides: list[str]) -> int:
    from accelvit.config import load_config

    return load_config(recipe, overrides, check_paths=False).model.patch_size


def family_overrides(
    family: str, name: str, common: list[str], budget: float, runs: Path, seed: int = 0
) -> tuple[Path, list[str], float]:
    """The recipe, overrides and row fields of one family's run: the up-front estimator minutes, and
    the plan's stages for the plan."""
    baseline = REPO / f"recipes/{name}-fmnist-baseline.yaml"
    accel = REPO / f"recipes/{name}-fmnist-accel.yaml"
    # as time_to_accuracy_curves trains its points, so that uncompressed and curriculum are the same
    # runs as its frontier points at this budget (`frontier_row`)
    budgeted = [*common, *TRAINING, "train.steps=null", f"train.budget={budget}"]
    base = _base_patch(baseline, common)
    mean = curriculum_mean_cost(accel, budgeted)
    cost = step_cost_fn(accel, budgeted)
    metric = "groups" if family.endswith("-groups") else "model"  # plan's and adaptive's
    metric = "descent" if family.startswith("descent") else metric
    metric = "lookahead" if family.startswith("lookahead") else metric
    if family == "uncompressed":  # the baseline's own schedule over as many steps as the budget buys
        steps = round(budget / full_step_units(baseline, common))
        return baseline, [*common, *TRAINING, f"train.steps={steps}"], {"estimator_minutes": 0.0}
    if family == "curriculum":
        return accel, budgeted, {"estimator_minutes": 0.0}
    if family == "constant":
        fixed = constant_setting(cost, base, mean)
        settings = [f"schedule.keep={fixed.keep}", f"schedule.patch={fixed.patch}", "schedule.merge=0"]
        return accel, [*budgeted, *settings], {"estimator_minutes": 0.0}
    if family == "random":
        weights = random_weights(cost, base, mean)
        patch = f"{{shape: random, choices: [{base}, {2 * base}], weights: {weights}}}"
        settings = ["schedule.keep=1.0", f"schedule.patch={patch}", "schedule.merge=0"]
        return accel, [*budgeted, *settings], {"estimator_minutes": 0.0}
    if family.startswith("plan") or family == "descent-plan":
        trained = family.startswith(("plan-trained", "descent"))
        path, minutes, stages = plan_schedule(baseline, common, budget, runs, name, seed, metric, trained)
        settings = ["schedule.keep=1.0", "schedule.merge=0", f"schedule.file={path}"]
        return accel, [*budgeted, *settings], {"estimator_minutes": round(minutes, 3), "plan": stages}
    if family in ("adaptive", "adaptive-groups", "descent-adaptive", *LOOKAHEAD):
        settings = [
            "schedule.mode=adaptive",
            f"schedule.stages={list(STAGES)}",
            f"schedule.candidates={_candidates(base)}",
            f"schedule.adaptive_metric={metric}",
            *LOOKAHEAD.get(family, []),
        ]
        return accel, [*budgeted, *settings], {"estimator_minutes": 0.0}
    raise ValueError(family)


def main(argv: list[str] | None = None) -> dict:
    from accelvit.config import load_config

    args = parse_args(argv)
    size = "smoke" if args.smoke else "gpu" if args.gpu else "cpu"
    common = [*{"smoke": SMOKE, "gpu": GPU, "cpu": []}[size], f"train.seed={args.seed}"]
    runs = Path(args.runs) / ("" if size == "cpu" else size)
    runs.mkdir(parents=True, exist_ok=True)
    suffix = "" if size == "cpu" else f"-{size}"
    out = args.output or str(RESULTS / f"schedule_families{suffix}-{device().type}.json")
    earlier = earlier_result(out)
    cache, names, seed = cached_rows(earlier), args.objectives.split(","), args.seed
    families = args.families.split(",")
    curves = earlier_result(args.curves).get("rows", []) if args.curves else []
    # the rows this call does not measure stay as they are (measured in sittings or lanes of their own)
    rows = [
        r for r in earlier.get("rows", [])
        if r["objective"] not in names or r.get("seed", 0) != seed or r["family"] not in families
    ]  # fmt: skip
    for name in names:
        baseline = REPO / f"recipes/{name}-fmnist-baseline.yaml"
        units = load_config(baseline, common).train.steps * full_step_units(baseline, common)
        budget = args.fraction * units
        for family in families:
            recipe, overrides, extra = family_overrides(family, name, common, budget, runs, seed)
            run_dir = runs / f"{name}-{family}-{args.fraction:g}{_seed_suffix(seed)}"
            fields = {"objective": name, "family": family, "fraction": args.fraction, "seed": seed}
            fields |= {"overrides": overrides, **extra}
            twin = _same_plan(rows, fields)
            point = frontier_row(load_config(recipe, overrides, check_paths=False), curves, fields)
            if twin is not None:  # the same schedule at the same budget and seed trains the same run
                row = {**twin, **fields, "same_run_as": twin["family"]}
            elif point is not None:
                row = point
            else:
                splits = [] if size == "smoke" else FULL_SPLITS  # smoke: its synthetic splits
                row = scored_run(recipe, overrides, run_dir, cache, fields, splits=splits)
                last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
                row["estimator_units"] = last.get("estimator_spent", 0.0)
            rows.append(row)
            print(f"{name:>7} {family:>12}: kNN {row['knn_top1']:.4f}, linear {row['linear_top1']:.4f}, "
                  f"{row['step']} steps, {row['minutes']:.1f} min", flush=True)  # fmt: skip
            write_result("schedule_families", {"size": size, "rows": rows, "means": family_means(rows)}, out)
    means = family_means(rows)
    print(format_table(rows))
    print(format_means(means))
    return write_result("schedule_families", {"size": size, "rows": rows, "means": means}, out)


def frontier_row(cfg, curves: list[dict], fields: dict) -> dict | None:
    """The time_to_accuracy_curves point trained from the same recipe (its key) and scored on the
    full splits, as a row of this table: uncompressed and curriculum are frontier points at this
    budget. Its minutes are the curves' (each setting timed alone), not a shared machine's."""
    key = recipe_key(cfg)
    point = next((r for r in curves if r["run_recipe"] == key), None)
    if point is None:
        return None
    scores = {"knn_top1": point["knn"], "linear_top1": point["linear"]}
    scores |= {k: point[k] for k in ("step", "minutes", "knn_se", "linear_se", "test_size", "run_recipe")}
    fixed = {"splits": FULL_SPLITS, "estimator_units": 0.0, "from": "time_to_accuracy_curves"}
    return {**fields, **scores, **fixed}


def _same_plan(rows: list[dict], fields: dict) -> dict | None:
    """A measured row whose planned schedule, objective, budget and seed are this one's."""
    if "plan" not in fields:
        return None
    keys = ("objective", "fraction", "plan")
    for r in rows:
        if all(r.get(k) == fields[k] for k in keys) and r.get("seed", 0) == fields["seed"]:
            return r
    return None


def family_means(rows: list[dict]) -> list[dict]:
    """Per objective and family, kNN and linear top-1 averaged over seeds, with the standard error of
    the mean, and the difference to the hand curriculum's mean with its standard error: within one
    standard error it is a tie. Rows scored on the full splits only (they carry standard errors)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if "knn_se" in r:
            groups.setdefault((r["objective"], r["family"]), []).append(r)
    means = {}
    for (objective, family), group in groups.items():
        n = len(group)
        mean = {"objective": objective, "family": family, "seeds": sorted(r.get("seed", 0) for r in group)}
        for metric in ("knn", "linear"):
            mean[metric] = sum(r[f"{metric}_top1"] for r in group) / n
            mean[f"{metric}_se"] = math.sqrt(sum(r[f"{metric}_se"] ** 2 for r in group)) / n
        means[objective, family] = mean
    for (objective, family), mean in means.items():
        hand = means.get((objective, "curriculum")) if family != "curriculum" else None
        for metric in ("knn", "linear") if hand else ():
            diff = mean[metric] - hand[metric]
            se = math.hypot(mean[f"{metric}_se"], hand[f"{metric}_se"])
            verdict = "tie" if abs(diff) <= se else "better" if diff > 0 else "worse"
            mean[f"{metric}_vs_curriculum"] = {"diff": diff, "se": se, "verdict": verdict}
    return list(means.values())


def format_means(means: list[dict]) -> str:
    lines = [
        "| objective | family | seeds | kNN top-1 | vs curriculum | linear top-1 | vs curriculum |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in means:
        cells = []
        for metric in ("knn", "linear"):
            cells.append(f"{m[metric]:.4f} ± {m[f'{metric}_se']:.4f}")
            versus = m.get(f"{metric}_vs_curriculum")
            cells.append(f"{versus['diff']:+.4f} ({versus['verdict']})" if versus else "-")
        seeds = ",".join(map(str, m["seeds"]))
        lines.append(f"| {m['objective']} | {m['family']} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_table(rows: list[dict]) -> str:
    lines = [
        "| objective | family | seed | kNN top-1 | linear top-1 | minutes | steps | estimator |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        estimator = (
            f"{r['estimator_units']:.3g} units" if r["estimator_units"]
            else f"{r['estimator_minutes']:.1f} min" if r["estimator_minutes"] else "-"
        )  # fmt: skip
        lines.append(
            f"| {r['objective']} | {r['family']} | {r.get('seed', 0)} | {r['knn_top1']:.4f} "
            f"| {r['linear_top1']:.4f} | {r['minutes']:.1f} | {r['step']} | {estimator} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
