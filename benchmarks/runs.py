"""Benchmark runs as accelvit run directories: trained once, resumed when unfinished, reused when done.

A measurement can then span several sittings (Ctrl-C or SIGTERM checkpoints the run in progress), and
a run directory serves every benchmark that asks for the same recipe (the learning curves and the
baseline of time to accuracy share theirs).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import yaml

from accelvit.checkpoint import (
    METRICS,
    RECIPE,
    checkpoint_step,
    create_run_dir,
    latest_checkpoint,
    read_metrics,
    run_lock,
)
from accelvit.config import Config, ConfigError, changed_keys, load_config
from accelvit.train import pretrain


def train_run(recipe: Path, overrides: list[str], run_dir: Path, train: bool = True) -> bool:
    """Train `run_dir` to its end: create it, resume it, or leave a finished run as it is; whether it
    is finished (`train=False`: only say so, for scoring what is done while runs train elsewhere).

    Raises SystemExit when the directory holds a run of another recipe, when another process trains
    it, or when a signal stopped it.
    """
    cfg = load_config(recipe, overrides)
    exists = (run_dir / RECIPE).is_file()
    if exists and not same_run(load_config(run_dir / RECIPE), cfg):
        raise SystemExit(f"{run_dir} was trained with another recipe than {recipe.name}; move it away")
    last = latest_checkpoint(run_dir) if exists else None
    if last is not None and _finished(run_dir, last):
        return True
    if not train:
        return False
    if not exists:
        create_run_dir(run_dir, cfg)
    try:
        with run_lock(run_dir):  # two benchmarks on one run would interleave its files
            result = pretrain(cfg, run_dir, resume=last is not None)
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None
    if result.stopped:
        raise SystemExit(f"stopped; run the benchmark again to resume {run_dir}")
    return True


def same_run(a: Config, b: Config) -> bool:
    """Whether two resolved recipes train the same run: equal but for keys that are inert in it (the
    estimator's K without estimator points or adaptive stages), so that a changed default of such a
    key does not retrain finished runs."""
    inert = {}
    if not b.train.grad_error_at:
        inert["train"] = dataclasses.replace(b.train, grad_error_batches=a.train.grad_error_batches)
    if b.schedule.mode != "adaptive":
        adaptive = {k: getattr(a.schedule, k) for k in ("adaptive_batches", "adaptive_metric")}
        inert["schedule"] = dataclasses.replace(b.schedule, **adaptive)
    return a == dataclasses.replace(b, **inert)


def _finished(run_dir: Path, checkpoint: Path) -> bool:
    """Whether the newest checkpoint is the run's last (its metrics reach progress 1)."""
    records = read_metrics(run_dir) if (run_dir / METRICS).is_file() else []
    step = checkpoint_step(checkpoint)
    return any(r.get("step") == step and r.get("progress", 0) >= 1 for r in records)


def recipe_key(cfg: Config) -> str:
    """A run's identity in result files: the digest of its recipe's values that differ from the
    defaults, so that finished runs stay found when accelvit adds a recipe key (whose default keeps
    the old behaviour), and a run of a changed recipe does not."""
    return hashlib.sha256(yaml.safe_dump(changed_keys(cfg), sort_keys=True).encode()).hexdigest()[:16]


def recipe_digest(run_dir: Path) -> str:
    """What a cached result must match: the key of the run's recipe (a retrained run is scored again)."""
    return recipe_key(load_config(run_dir / RECIPE, check_paths=False))


def training_minutes(run_dir: Path, step: int | None = None) -> float:
    """Training minutes up to `step` (default: all): the step and data time of every metrics line."""
    seconds = 0.0
    for record in read_metrics(run_dir):
        if (step is None or record["step"] <= step) and "step_s" in record:
            seconds += record["step_s"] + record["data_s"]
    return seconds / 60


def alone_minutes(recipe: Path, overrides: list[str], steps: int = 100, warmup: int = 20) -> float:
    """Training minutes of the recipe's whole run, from the median step (and data) time of `steps`
    steps timed in a throwaway run, the first `warmup` not counted. Runs trained side by side share
    the cores, so their own minutes do not give a wall-clock ratio; this times the uncompressed
    baseline, whose steps all cost the same, on whatever the machine has free now (run it alone).
    The median: the mean of 40 steps moved by 25% between repeats here (31 to 41 minutes)."""
    cfg = load_config(recipe, overrides)
    return median_step_seconds(recipe, overrides, steps, warmup) * cfg.train.steps / 60


def median_step_seconds(recipe: Path, overrides: list[str], steps: int, warmup: int) -> float:
    """Median seconds of a step, data included, over `steps` steps of the recipe (with `overrides`)
    in a throwaway run, the first `warmup` not counted."""
    import statistics
    import tempfile

    timed = [
        f"train.steps={steps}",
        "train.budget=null",
        "train.log_every=1",
        "train.eval_every=null",
        f"train.checkpoint_every={steps}",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        run_dir, short = Path(tmp) / "run", load_config(recipe, [*overrides, *timed])
        create_run_dir(run_dir, short)
        pretrain(short, run_dir)
        seconds = [
            r["step_s"] + r["data_s"] for r in read_metrics(run_dir) if "step_s" in r and r["step"] > warmup
        ]
    return statistics.median(seconds)


def final_step(run_dir: Path) -> int:
    """The step of the run's newest checkpoint."""
    last = latest_checkpoint(run_dir)
    if last is None:
        raise SystemExit(f"{run_dir} has no checkpoint")
    return checkpoint_step(last)


def earlier_result(out: str | Path) -> dict:
    """The JSON a benchmark wrote in an earlier sitting ({} if none)."""
    path = Path(out)
    return json.loads(path.read_text()) if path.is_file() else {}


def cached_rows(earlier: dict) -> dict[tuple[str, int], dict]:
    """The rows of an earlier result, keyed by (run recipe digest, step): reused, not rescored."""
    return {(r["run_recipe"], r["step"]): r for r in earlier.get("rows", [])}


def other_objectives(earlier: dict, key: str, names: list[str]) -> list | dict:
    """`earlier[key]` (rows, or a dict by objective) without the objectives in `names`: each objective
    can be measured in a sitting of its own, and the others' results stay as they are."""
    value = earlier.get(key, [] if key == "rows" else {})
    if isinstance(value, list):
        return [r for r in value if r["objective"] not in names]
    return {k: v for k, v in value.items() if k not in names}


def scored_run(
    recipe: Path,
    overrides: list[str],
    run_dir: Path,
    cache: dict,
    fields: dict,
    train: bool = True,
    splits: list[str] | None = None,
) -> dict | None:
    """Train `run_dir` to its end and score its final checkpoint (kNN and a linear probe) into a row
    that starts with `fields`, or take the row from `cache` ((recipe digest, step) -> row) when the
    same run was scored before on the same splits. `train=False`: None for a run that is not
    finished. `splits`: evaluation overrides (e.g. FULL_SPLITS); the row then has standard errors."""
    from accelvit.evaluate import evaluate_run

    if not train_run(recipe, overrides, run_dir, train):
        return None
    step, identity = final_step(run_dir), recipe_digest(run_dir)
    cached = cache.get((identity, step))
    if cached is not None and cached.get("splits") == splits:  # families can train alike
        return {**cached, **fields}
    result = evaluate_run(run_dir, linear=True, overrides=splits or ())
    n = result["test_size"]
    return {
        **fields,
        "step": step,
        "minutes": round(training_minutes(run_dir), 3),
        "knn_top1": result["knn_top1"],
        "linear_top1": result["linear_top1"],
        "knn_se": math.sqrt(result["knn_top1"] * (1 - result["knn_top1"]) / n),
        "linear_se": math.sqrt(result["linear_top1"] * (1 - result["linear_top1"]) / n),
        "test_size": n,
        "splits": splits,
        "run_recipe": identity,
    }
