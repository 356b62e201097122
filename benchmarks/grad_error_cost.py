"""The gradient-bias estimator's own cost: K batches and 6 strategies, 1 process against 2 (CPU).

Runs `accelvit grad-error` on a recipe (default: the quickstart at a fresh init) with one process
and with `torchrun --nproc_per_node 2` (gloo), and reports the command's wall time, the estimator's
own time (`wall_s` of the report, start-up excluded) and the speedup of 2 processes.

    python -m benchmarks.grad_error_cost                # quickstart recipe, K = 8
    python -m benchmarks.grad_error_cost --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also run as `python benchmarks/NAME.py`
from benchmarks.common import REPO, SMOKE_RECIPE, write_result  # noqa: E402

STRATEGIES = "0.5:4,0.25:4,1.0:8,0.5:8,0.25:8,1.0:16"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=str(REPO / "recipes/quickstart.yaml"))
    p.add_argument("--batches", type=int, default=8, help="K")
    p.add_argument("--strategies", default=STRATEGIES)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("-o", "--output", default=None)
    return p.parse_args(argv)


def run(processes: int, args: argparse.Namespace, sets: list[str], out: Path) -> dict:
    launcher = [sys.executable, "-m", "accelvit.cli"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                    "--master_port", "29541", "-m", "accelvit.cli"]  # fmt: skip
    command = [*launcher, "grad-error", args.recipe, "--batches", str(args.batches), "--strategies",
               args.strategies, "-o", str(out)]  # fmt: skip
    for item in sets:
        command += ["--set", item]
    threads = str(max(1, (os.cpu_count() or 1) // processes))  # the same cores in both runs
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": threads}
    tick = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=3600)
    wall = time.perf_counter() - tick
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    report = json.loads(out.read_text())
    return {
        "processes": processes,
        "command_s": wall,
        "estimator_s": report["wall_s"],
        "batches": report["batches"],
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    sets = SMOKE_RECIPE if args.smoke else []
    if args.smoke:
        args.batches, args.strategies = 2, "0.5:4,1.0:8"
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(n, args, sets, Path(tmp) / f"report{n}.json") for n in (1, 2)]
    rows[1]["speedup"] = rows[0]["estimator_s"] / rows[1]["estimator_s"]
    rows[0]["speedup"] = 1.0
    print(f"{'processes':>9} {'command_s':>10} {'estimator_s':>12} {'speedup':>8}")
    for r in rows:
        print(f"{r['processes']:9d} {r['command_s']:10.1f} {r['estimator_s']:12.1f} {r['speedup']:8.2f}")
    result = {
        "recipe": Path(args.recipe).name,
        "overrides": sets,
        "batches": args.batches,
        "strategies": args.strategies,
        "rows": rows,
    }
    return write_result("grad_error_cost", result, args.output)


if __name__ == "__main__":
    main()
