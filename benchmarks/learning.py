"""Does it learn? Each objective's uncompressed baseline recipe, trained to its full budget.

For SimCLR, MoCo-v3 and DINO it trains `recipes/OBJ-fmnist-baseline.yaml` (seed 0, and more seeds
with `--seeds`), then scores the checkpoints at 1/4, 1/2 and all of the recipe's steps (kNN top-1 of
the encoder the objective evaluates, `eval.encoder`) against two floors: the untrained backbone and
raw pixels, on the recipe's own train/test split. A run that a baseline does not lift clearly above
both floors has measured nothing about acceleration.

Each run is an accelvit run directory under `--runs`: a finished one is reused, an unfinished one
resumed, so the measurement can span several sittings (stop it with Ctrl-C or SIGTERM: the run
checkpoints first). Rows are written to the JSON as they come. Minutes are training time to the
checkpoint, summed from the run's metrics.jsonl (step and data time, not evaluation or saving).

    python -m benchmarks.learning                         # all three, seed 0 (about 2 hours on 2 CPU cores)
    python -m benchmarks.learning --objectives mocov3 --seeds 0,1
    python -m benchmarks.learning --smoke                 # synthetic data, seconds
    python -m benchmarks.learning --objectives simclr --set data.views=byol --runs runs/byol -o byol.json
                                                          # a variant of the recipes (give it its own
                                                          # --runs and -o: rows name the overrides)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also run as `python benchmarks/NAME.py`
from benchmarks.common import REPO, RESULTS, SMOKE_SCORED, device, untrained_knn, write_result  # noqa: E402
from benchmarks.runs import (  # noqa: E402
    cached_rows,
    earlier_result,
    other_objectives,
    recipe_digest,
    train_run,
    training_minutes,
)

if TYPE_CHECKING:
    from accelvit.config import TrainConfig

FRACTIONS = (0.25, 0.5, 1.0)
SMOKE = [
    *SMOKE_SCORED,
    "train.steps=8",
    "train.checkpoint_every=2",
    "train.keep_checkpoints=4",
    "train.log_every=1",
    "train.eval_every=null",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--objectives", default="simclr,mocov3,dino")
    p.add_argument("--seeds", default="0", help="train.seed of each run, e.g. 0,1 (default 0)")
    p.add_argument("--runs", default=str(REPO / "runs" / "learning"), help="folder of the run directories")
    p.add_argument("--smoke", action="store_true", help="tiny model, synthetic data, 8 steps")
    p.add_argument("--no-train", action="store_true", help="score finished runs only; train nothing")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a recipe override")
    p.add_argument("-o", "--output", help="JSON to write (default benchmarks/results/learning-DEVICE.json)")
    return p.parse_args(argv)


def checkpoint_steps(train: TrainConfig) -> list[int]:
    """The checkpoints at FRACTIONS of the recipe's steps: each one it writes, keeps and logs at."""
    wanted = [round(f * train.steps) for f in FRACTIONS]
    missing = [s for s in wanted if s % train.checkpoint_every or s % train.log_every]
    if missing or train.keep_checkpoints < len(wanted):
        raise SystemExit(
            f"the recipe must checkpoint and log at steps {wanted} and keep {len(wanted)} checkpoints "
            f"(train.checkpoint_every {train.checkpoint_every}, log_every {train.log_every}, "
            f"keep_checkpoints {train.keep_checkpoints})"
        )
    return wanted


def main(argv: list[str] | None = None) -> dict:
    from accelvit.config import load_config
    from accelvit.evaluate import evaluate_run, pixel_knn

    args = parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = Path(args.runs) / ("smoke" if args.smoke else "")
    out = args.output or str(RESULTS / f"learning{'-smoke' if args.smoke else ''}-{device().type}.json")
    names, earlier = args.objectives.split(","), earlier_result(out)
    done = cached_rows(earlier)
    rows, floors = other_objectives(earlier, "rows", names), other_objectives(earlier, "floors", names)
    for name in names:
        recipe = REPO / f"recipes/{name}-fmnist-baseline.yaml"
        base = [*(SMOKE if args.smoke else []), *args.set]
        cfg = load_config(recipe, base)
        floors[name] = {
            "untrained_knn": untrained_knn(recipe, base),
            "pixels_knn": pixel_knn(cfg.model, cfg.data, cfg.eval),
        }
        print(f"{name:>7}: untrained {floors[name]['untrained_knn']:.4f}, "
              f"raw pixels {floors[name]['pixels_knn']:.4f}", flush=True)  # fmt: skip
        wanted = checkpoint_steps(cfg.train)
        for seed in seeds:
            run_dir = runs / f"{name}-baseline-seed{seed}"
            if not train_run(recipe, [*base, f"train.seed={seed}"], run_dir, train=not args.no_train):
                print(f"{name:>7} seed {seed}: {run_dir} is not finished; not scored (--no-train)")
                continue
            for step in wanted if seed == seeds[0] else wanted[-1:]:
                identity = recipe_digest(run_dir)
                row = done.get((identity, step))
                if row is None:
                    result = evaluate_run(run_dir, f"step_{step}")
                    row = {
                        "objective": name,
                        "recipe": recipe.name,
                        **({"overrides": args.set} if args.set else {}),
                        "seed": seed,
                        "step": step,
                        "budget": step / cfg.train.steps,
                        "knn_top1": result["knn_top1"],
                        "encoder": result["encoder"],
                        **floors[name],
                        "minutes": round(training_minutes(run_dir, step), 3),
                        "run_recipe": identity,
                    }
                rows.append(row)
                print(f"{name:>7} seed {seed} at {row['budget']:.2f} of the budget ({step} steps, "
                      f"{row['minutes']:.1f} min): kNN top-1 {row['knn_top1']:.4f}", flush=True)  # fmt: skip
                _write(rows, floors, seeds, out, runs)  # partial results as they come
    print(format_table(rows))
    plot(rows, Path(out).with_suffix(".png"))
    return _write(rows, floors, seeds, out, runs)


def _write(rows: list[dict], floors: dict, seeds: list[int], out: str, runs: Path) -> dict:
    seeds = sorted({*seeds, *(r["seed"] for r in rows)})
    result = {"seeds": seeds, "runs": str(runs), "floors": floors, "rows": rows}
    return write_result("learning", result, out)


def format_table(rows: list[dict]) -> str:
    lines = [
        "| objective | seed | budget | steps | minutes | kNN top-1 | untrained | raw pixels |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['objective']} | {r['seed']} | {r['budget']:.2f} | {r['step']} | {r['minutes']:.1f} "
            f"| {r['knn_top1']:.4f} | {r['untrained_knn']:.4f} | {r['pixels_knn']:.4f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """kNN top-1 against the fraction of the budget, one panel per objective, floors drawn across."""
    from accelvit.report import pyplot, save_figure

    plt = pyplot()

    names = list(dict.fromkeys(r["objective"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        mine = [r for r in rows if r["objective"] == name]
        for seed in dict.fromkeys(r["seed"] for r in mine):
            points = sorted((r["budget"], r["knn_top1"]) for r in mine if r["seed"] == seed)
            ax.plot(*zip(*points, strict=True), marker="o", label=f"seed {seed}")
        ax.axhline(mine[0]["pixels_knn"], color="grey", linestyle="--", label="raw pixels")
        ax.axhline(mine[0]["untrained_knn"], color="grey", linestyle=":", label="untrained")
        ax.set(title=name, xlabel="fraction of the recipe's budget", ylabel="kNN top-1", xlim=(0, 1.05))
        ax.legend(fontsize=8)
    print(f"wrote {save_figure(fig, path)}")


if __name__ == "__main__":
    main()
