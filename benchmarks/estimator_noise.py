"""How many batches K the gradient-error estimator needs to choose: its noise measured, not assumed.

On a run's checkpoint (default: the MoCo-v3 baseline of benchmarks/learning at half its budget, a
model in training), the estimator measures the default strategies R times on disjoint batches at
each K. Per K it reports the spread of CA-MSE over the repetitions against the jackknife standard
error a single report gives, how often the lowest CA-MSE is the strategy the largest K picks, and how
often `plan`'s tie rule (margin within NOISE_Z combined standard errors) calls the top two a tie.

    python -m benchmarks.estimator_noise --run runs/learning/mocov3-baseline-seed0
    python -m benchmarks.estimator_noise --smoke
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also run as `python benchmarks/NAME.py`
from benchmarks.common import REPO, SMOKE_RECIPE, write_result  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default=str(REPO / "runs/learning/mocov3-baseline-seed0"), help="run directory")
    p.add_argument("--checkpoint", default=None, help="checkpoint name (default: the one nearest half way)")
    p.add_argument("--ks", default="2,4,8", help="K values, each repeated --repeats times")
    p.add_argument("--repeats", type=int, default=4, help="repetitions on disjoint batches per K")
    p.add_argument("--reference", type=int, default=16, help="the K whose choice counts as right")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("-o", "--output", default=None)
    return p.parse_args(argv)


def _halfway(run: Path) -> Path:
    from accelvit.checkpoint import checkpoint_step, list_checkpoints

    found = list_checkpoints(run)
    last = checkpoint_step(found[-1])
    return min(found, key=lambda c: abs(checkpoint_step(c) - last / 2))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from accelerate.state import AcceleratorState

    from accelvit.build import estimate
    from accelvit.checkpoint import RECIPE, checkpoint_step, create_run_dir
    from accelvit.config import load_config, patch_sizes
    from accelvit.plan import NOISE_Z
    from accelvit.setting import default_strategies, setting_of
    from accelvit.train import pretrain

    run = Path(args.run)
    if args.smoke:  # a tiny trained run of its own
        import tempfile

        run = Path(tempfile.mkdtemp()) / "run"
        smoke = [*SMOKE_RECIPE, "train.budget=null", "train.steps=4"]
        cfg = load_config(REPO / "recipes/quickstart.yaml", smoke)
        create_run_dir(run, cfg)
        pretrain(cfg, run)
        AcceleratorState._reset_state(reset_partial_state=True)
        ks, repeats, reference = [2], 2, 3
    else:
        ks, repeats, reference = [int(k) for k in args.ks.split(",")], args.repeats, args.reference
    cfg = load_config(run / RECIPE, check_paths=not args.smoke)
    checkpoint = run / "checkpoints" / args.checkpoint if args.checkpoint else _halfway(run)
    step = checkpoint_step(checkpoint)
    strategies = default_strategies(cfg.model.patch_size, patch_sizes(cfg.model))

    def measure(k: int, offset: int) -> dict:
        report = estimate(cfg, strategies, k, checkpoint, step + offset)
        AcceleratorState._reset_state(reset_partial_state=True)
        return {setting_of(r).label: r for r in report["strategies"]}

    best_ref = measure(reference, 0)
    right = min(best_ref, key=lambda s: best_ref[s]["ca_mse"])
    rows, offset = [], reference
    for k in ks:
        reports = []
        for _ in range(repeats):
            reports.append(measure(k, offset))
            offset += k  # disjoint batches of the run's stream
        for label in best_ref:
            values = [r[label]["ca_mse"] for r in reports]
            errors = [r[label]["ca_mse_se"] for r in reports if r[label]["ca_mse_se"] is not None]
            rows.append({
                "k": k,
                "strategy": label,
                "ca_mse_mean": statistics.mean(values),
                "ca_mse_spread": statistics.stdev(values) if len(values) > 1 else None,
                "ca_mse_se_mean": statistics.mean(errors) if errors else None,
                "reference_ca_mse": best_ref[label]["ca_mse"],
            })  # fmt: skip
        picks = [min(r, key=lambda s: r[s]["ca_mse"]) for r in reports]
        ties = 0
        for r in reports:
            first, second = sorted(r, key=lambda s: r[s]["ca_mse"])[:2]
            a, b = r[first], r[second]
            ses = (a["ca_mse_se"], b["ca_mse_se"])
            margin = b["ca_mse"] - a["ca_mse"]
            ties += all(e is not None for e in ses) and margin <= NOISE_Z * math.hypot(*ses)
        rows.append({"k": k, "strategy": "(choice)", "agree": sum(p == right for p in picks) / len(picks),
                     "ties": ties / len(reports), "picks": picks})  # fmt: skip
        print(_table(rows, right, reference), flush=True)
    return write_result(
        "estimator_noise",
        {"run": str(run), "checkpoint": checkpoint.name, "reference_k": reference, "reference_choice": right,
         "repeats": repeats, "noise_z": NOISE_Z, "rows": rows},
        args.output,
    )  # fmt: skip


def _table(rows: list[dict], right: str, reference: int) -> str:
    head = "| K | strategy | CA-MSE mean | spread over repeats | jackknife SE (mean) | K=ref CA-MSE |"
    lines = [f"reference: K={reference} picks {right}", head, "|---|---|---|---|---|---|"]
    for r in rows:
        if r["strategy"] == "(choice)":
            choice = f"agree {r['agree']:.2f} | ties {r['ties']:.2f}"
            lines.append(f"| {r['k']} | picks {r['picks']} | {choice} | | |")
        else:
            cells = [r["ca_mse_mean"], r["ca_mse_spread"], r["ca_mse_se_mean"], r["reference_ca_mse"]]
            text = " | ".join("" if c is None else f"{c:.3e}" for c in cells)
            lines.append(f"| {r['k']} | {r['strategy']} | {text} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
