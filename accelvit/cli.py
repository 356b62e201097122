"""`accelvit` command line: subcommands that call the library's functions.

Problems with the user's input end with one line on stderr and exit code 2, before anything is
written.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import time
from pathlib import Path

from accelvit.config import ConfigError, defaults_markdown, describe_defaults, load_config


def _pretrain(args: argparse.Namespace) -> int:
    import torch

    from accelvit.backbone import build_backbone, vit_shape
    from accelvit.checkpoint import RunInUse, check_run_dir, create_run_dir, discard_unstarted, run_lock
    from accelvit.distributed import process_state
    from accelvit.train import pretrain

    cfg = load_config(args.recipe, args.set)
    with torch.device("meta"):  # a model timm cannot build fails before the run directory exists
        backbone = build_backbone(cfg.model)
    check_memory(cfg, vit_shape(backbone, cfg.model.image_size))
    run_dir = Path(args.output) if args.output else _default_run_dir(Path(args.recipe))
    check_run_dir(run_dir, args.overwrite)  # before anything is written, the lock file included
    processes = process_state(cfg.train.process_timeout)  # the process group, with the recipe's timeout
    before = set(run_dir.iterdir()) if run_dir.is_dir() else None
    try:
        # the lock first: --overwrite must never delete a run that another process is training
        with run_lock(run_dir):
            create_run_dir(run_dir, cfg, overwrite=args.overwrite)
            if processes.is_main_process:
                print(f"run directory: {run_dir}", flush=True)
            pretrain(cfg, run_dir)
    except ConfigError as exc:  # bad input only the run could see (no readable image): leave nothing behind
        if processes.is_main_process and not isinstance(exc, RunInUse):
            discard_unstarted(run_dir, None if args.overwrite else before)
        raise
    return 0


def check_memory(cfg, shape) -> None:
    """Refuse a recipe whose step cannot fit in memory, even by a lower bound, before any work:
    it would otherwise fail in the first step's allocation, or take the machine down with it."""
    import torch

    from accelvit.budget import activation_bytes
    from accelvit.distributed import use_cpu

    views = 2  # every objective trains on two full-size views at least
    half = cfg.train.precision in ("bf16", "fp16")
    needed = activation_bytes(shape, cfg.model.patch_size, views * cfg.train.batch_size, 2 if half else 4)
    if torch.cuda.is_available() and not use_cpu():
        have, where = torch.cuda.get_device_properties(0).total_memory, "the GPU's"
    else:
        have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's"
    if needed > have:
        raise ConfigError(
            f"model.image_size = {cfg.model.image_size} with train.batch_size = {cfg.train.batch_size}: a "
            f"step keeps at least {needed / 2**30:.0f} GiB of activations, more than {where} "
            f"{have / 2**30:.0f} GiB; lower either"
        )


def _default_run_dir(recipe: Path) -> Path:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # each process would stamp its own time; they must agree on one folder
        raise ConfigError("-o RUN_DIR is required when several processes are launched")
    return Path("runs") / f"{recipe.stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def _resume(args: argparse.Namespace) -> int:
    from accelvit.checkpoint import check_resumable, run_lock, run_recipe
    from accelvit.distributed import process_state
    from accelvit.train import pretrain

    run_dir = Path(args.run_dir)
    cfg = run_recipe(run_dir)
    check_resumable(run_dir)
    process_state(cfg.train.process_timeout)
    with run_lock(run_dir):
        pretrain(cfg, run_dir, resume=True)
    return 0


def _schedule(args: argparse.Namespace) -> int:
    from accelvit.budget import sample_rows, simulate
    from accelvit.build import flops_cost, measured_cost_fn, recipe_shape
    from accelvit.checkpoint import check_output
    from accelvit.report import figure_path, format_schedule, plot_schedule

    if args.rows < 2:
        raise ConfigError(f"--rows {args.rows}: at least 2 (the first and the last step)")
    if args.processes < 1:
        raise ConfigError(f"--processes {args.processes}: at least 1")
    plot = check_output(figure_path(Path(args.plot)), "--plot") if args.plot else None  # before the table
    cfg = load_config(args.recipe, args.set, check_paths=False)
    shape = recipe_shape(cfg)
    global_batch = cfg.train.batch_size * args.processes
    rows = simulate(cfg, shape, flops_cost(cfg, shape), global_batch)
    measured = simulate(cfg, shape, measured_cost_fn(cfg), global_batch) if args.measure else None
    print(format_schedule(sample_rows(rows, args.rows), rows, global_batch, measured))
    if cfg.schedule.mode == "adaptive":
        print("adaptive: the run picks each stage's setting; shown are its ramps before the first stage")
    if plot:
        print(f"plot: {plot_schedule(sample_rows(rows, 401), plot, title=Path(args.recipe).name)}")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from accelvit.shards import prepare

    folder, out = Path(args.folder), Path(args.output)
    if not folder.is_dir():
        raise ConfigError(f"prepare: '{folder}' is not a folder of images")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"-o {out}: exists and is not an empty folder (shards are never written over)")
    if args.max_side < 8:
        raise ConfigError(f"--max-side {args.max_side}: at least 8 pixels")
    if not 1 <= args.quality <= 100:
        raise ConfigError(f"--quality {args.quality}: from 1 to 100")
    counts = prepare(folder, out, args.max_side, args.quality)
    print(", ".join(f"{split}: {n} images" for split, n in counts.items()) + f"; shards in {out}")
    print(f"train on them with: --set data.dataset=shards --set data.root={out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from accelvit.export import export_backbone

    out = export_backbone(Path(args.run_dir), Path(args.output), args.checkpoint, args.encoder)
    print(f"backbone written to {out}")
    return 0


def _embed(args: argparse.Namespace) -> int:
    from accelvit.embed import check_format, embed_folder, image_files, load_encoder, write_embeddings

    out, folder = Path(args.output), Path(args.data)
    check_format(out)  # before the minutes of feature extraction
    files = image_files(folder)
    vit, model = load_encoder(Path(args.source), args.checkpoint, args.encoder)
    features = embed_folder(vit, model, files, args.batch_size, args.workers)
    names = [str(p.relative_to(folder)) for p in files]
    written = write_embeddings(out, names, features)
    print(f"{len(files)} embeddings of {features.shape[1]} dimensions: {', '.join(map(str, written))}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from accelvit.evaluate import EVAL_FILE, evaluate_run

    run_dir = Path(args.run_dir)
    result = evaluate_run(run_dir, args.checkpoint, args.linear, args.pixels, args.encoder, args.set)
    print(
        f"step {result['step']} ({result['encoder']}): kNN top-1 {result['knn_top1']:.4f} "
        f"(k={result['k']}, {result['train_size']} train / {result['test_size']} test images)"
    )
    if "linear_top1" in result:
        print(f"linear probe top-1 {result['linear_top1']:.4f}")
    if "pixel_knn_top1" in result:
        print(f"raw-pixel kNN top-1 {result['pixel_knn_top1']:.4f}")
    print(f"written to {run_dir / EVAL_FILE}")
    return 0


def _grad_error(args: argparse.Namespace) -> int:
    from accelvit.build import estimate
    from accelvit.checkpoint import RECIPE, check_output, checkpoint_step
    from accelvit.config import patch_sizes
    from accelvit.export import resolve_checkpoint
    from accelvit.report import grad_table, write_grad_report
    from accelvit.setting import strategies_or_default

    for suffix in (".json", ".md", ".png"):  # the report and the two files beside it
        check_output(Path(args.output).with_suffix(suffix))
    source = Path(args.source)
    checkpoint, step = None, 0
    if source.is_dir():
        if not (source / RECIPE).is_file():
            raise ConfigError(f"'{source}' is neither a recipe nor a run directory (no {RECIPE})")
        cfg = load_config(source / RECIPE, args.set)
        checkpoint = resolve_checkpoint(source, args.checkpoint)
        step = checkpoint_step(checkpoint)
    else:
        cfg = load_config(source, args.set)
    try:
        allowed = patch_sizes(cfg.model)
        strategies = strategies_or_default(args.strategies, cfg.model.patch_size, allowed)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if args.batches < 2:
        raise ConfigError(f"--batches {args.batches}: at least 2 are needed for a variance")
    try:
        report = estimate(cfg, strategies, args.batches, checkpoint, step)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    from accelerate import PartialState

    if PartialState().is_main_process:
        paths = write_grad_report(report, Path(args.output))
        print(grad_table(report))
        print("written: " + ", ".join(str(p) for p in paths))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from accelvit.checkpoint import check_output
    from accelvit.gradbias import SCHEMA
    from accelvit.report import compare_table, figure_path, load_grad_report, plot_grad_report

    if args.output:
        check_output(Path(args.output))
    plot = check_output(figure_path(Path(args.plot)), "--plot") if args.plot else None
    paths = [Path(p) for p in args.reports]
    reports = [load_grad_report(p, SCHEMA) for p in paths]
    labels = [p.stem for p in paths]
    table = compare_table(reports, labels)
    print(table)
    if args.output:
        Path(args.output).write_text(table)
    if plot:
        print(f"plot: {plot_grad_report(reports, plot, labels)}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from accelvit.checkpoint import check_output
    from accelvit.gradbias import SCHEMA
    from accelvit.plan import format_plan, plan, plan_warnings, schedule_from_plan, write_schedule
    from accelvit.report import load_grad_report

    check_output(Path(args.output))
    paths = [Path(p) for p in args.reports]
    reports = [load_grad_report(p, SCHEMA) for p in paths]
    bases = {r["model"]["patch_size"] for r in reports}
    if len(bases) != 1:
        raise ConfigError(f"the reports come from models with different base patch sizes {sorted(bases)}")
    base = bases.pop()
    stages = plan(reports, base, args.cost, args.metric)
    print(format_plan(stages))
    if args.metric == "descent":  # what the criterion adds to the estimator: two gradients a process
        probe, total = (sum(r.get(k, 0.0) for r in reports) for k in ("curvature_s", "wall_s"))
        print(f"descent's curvature probe took {probe:.1f} s of the reports' {total:.1f} s")
    for warning in plan_warnings(reports, stages, base):
        print(f"warning: {warning}")
    write_schedule(Path(args.output), schedule_from_plan(stages), [p.name for p in paths])
    print(f"schedule written to {args.output}; use it with --set schedule.file={args.output}")
    return 0


def _diagnose(args: argparse.Namespace) -> int:
    from accelvit.checkpoint import DIAGNOSTICS, check_output, read_records
    from accelvit.report import diagnostics_table, figure_path, plot_diagnostics

    output = check_output(figure_path(Path(args.output)))
    runs = {}
    for run_dir in map(Path, args.run_dirs):
        path = run_dir / DIAGNOSTICS
        if not path.is_file():
            raise ConfigError(f"'{run_dir}' has no {DIAGNOSTICS} (train with train.diagnostics_every set)")
        runs[str(run_dir)] = read_records(path)
        if not runs[str(run_dir)]:
            raise ConfigError(f"'{path}' holds no complete record")
    print(diagnostics_table(runs))
    print(f"plot: {plot_diagnostics(runs, output)}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from accelvit.checkpoint import METRICS, check_output, read_metrics
    from accelvit.report import figure_path, plot_runs

    output = check_output(figure_path(Path(args.output)))
    runs = {}
    paths = [Path(p) for p in args.run_dirs]
    names = [p.name for p in paths]
    for run_dir, name in zip(paths, names, strict=True):
        if not (run_dir / METRICS).is_file():
            raise ConfigError(f"'{run_dir}' has no {METRICS}: not a run directory, or a run not started")
        runs[name if names.count(name) == 1 else str(run_dir)] = read_metrics(run_dir)  # short labels
    print(f"plot: {plot_runs(runs, output)}")
    return 0


def _defaults(args: argparse.Namespace) -> int:
    print(defaults_markdown() if args.markdown else describe_defaults(), end="")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line errors of the rest of accelvit: no usage block before them."""

    def error(self, message: str):
        command = self.prog.removeprefix("accelvit").strip()
        where = f"{command}: " if command else ""
        self.exit(2, f"accelvit: error: {where}{message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="accelvit", description="Cheaper self-supervised ViT pretraining.")
    sub = parser.add_subparsers(dest="command", required=True)

    def encoder_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--encoder",
            choices=["student", "teacher"],
            help="student or the momentum teacher (default: eval.encoder, else the objective's reference)",
        )

    def overrides(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a recipe key, e.g. --set train.steps=500 (value parsed as YAML)",
        )

    p = sub.add_parser("pretrain", help="pretrain a ViT from a YAML recipe")
    p.add_argument("recipe")
    p.add_argument("-o", "--output", help="run directory (default: runs/RECIPE-TIMESTAMP)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in -o")
    overrides(p)
    p.set_defaults(func=_pretrain)

    p = sub.add_parser("resume", help="continue a run from its newest complete checkpoint")
    p.add_argument("run_dir")
    p.set_defaults(func=_resume)

    p = sub.add_parser("schedule", help="print (and plot) a recipe's compression schedule")
    p.add_argument("recipe")
    p.add_argument("--plot", metavar="FILE.png", help="also draw the schedule")
    p.add_argument("--rows", type=int, default=11, help="rows of the table (default 11)")
    p.add_argument("--processes", type=int, default=1, help="processes the run will use (default 1)")
    p.add_argument("--measure", action="store_true", help="also time each setting on this machine")
    overrides(p)
    p.set_defaults(func=_schedule)

    p = sub.add_parser(
        "prepare", help="decode and resize an image folder once into shards (data.dataset: shards)"
    )
    p.add_argument("folder", help="class sub-folders, or train/ and val/ folders of them")
    p.add_argument("-o", "--output", required=True, help="folder to write the shards to (new or empty)")
    p.add_argument("--max-side", type=int, default=512, help="longer side of the stored images (default 512)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the stored images (default 90)")
    p.set_defaults(func=_prepare)

    p = sub.add_parser("export", help="write a run's backbone as timm safetensors")
    p.add_argument("run_dir")
    p.add_argument("-o", "--output", required=True, help="output .safetensors file")
    p.add_argument("--checkpoint", help="checkpoint name, e.g. step_500 (default: newest)")
    encoder_option(p)
    p.set_defaults(func=_export)

    p = sub.add_parser("embed", help="feature vectors of a folder of images (.npy + paths, .csv, .parquet)")
    p.add_argument("source", help="a run directory or a .safetensors file of accelvit export")
    p.add_argument("--data", required=True, help="a folder of images (class sub-folders or not)")
    p.add_argument("-o", "--output", required=True, help="OUT.npy (+ OUT.paths.txt), OUT.csv or OUT.parquet")
    p.add_argument("--checkpoint", help="checkpoint name, e.g. step_500 (default: newest)")
    p.add_argument("--batch-size", type=int, default=256, help="images a batch (default 256)")
    p.add_argument("--workers", type=int, default=2, help="image-decoding processes (default 2)")
    encoder_option(p)
    p.set_defaults(func=_embed)

    p = sub.add_parser("eval", help="kNN top-1 of a run's backbone on its dataset's labelled splits")
    p.add_argument("run_dir")
    p.add_argument("--checkpoint", help="checkpoint name, e.g. step_500 (default: newest)")
    p.add_argument("--linear", action="store_true", help="also train a linear probe")
    p.add_argument("--pixels", action="store_true", help="also the raw-pixel kNN baseline")
    encoder_option(p)
    overrides(p)
    p.set_defaults(func=_eval)

    p = sub.add_parser("grad-error", help="compare compressed and full-input gradients")
    p.add_argument("source", metavar="RECIPE_OR_RUN_DIR")
    p.add_argument("--checkpoint", help="checkpoint of a run (default: newest)")
    p.add_argument("--strategies", help="keep:patch[:merge] list, e.g. 1.0:16,0.5:16,0.25:32,1:16:0.2")
    p.add_argument("--batches", type=int, default=8, help="K, the number of batches (default 8)")
    p.add_argument("-o", "--output", required=True, help="REPORT.json (.md and .png go beside it)")
    overrides(p)
    p.set_defaults(func=_grad_error)

    p = sub.add_parser("compare", help="put grad-error reports side by side")
    p.add_argument("reports", nargs="+")
    p.add_argument("-o", "--output", help="write the Markdown table here")
    p.add_argument("--plot", help="PNG of bias² and CA-MSE against cost")
    p.set_defaults(func=_compare)

    p = sub.add_parser("plan", help="budget-optimal step schedule from grad-error reports")
    p.add_argument("reports", nargs="+", help="reports taken at several progress points of a run")
    p.add_argument("-o", "--output", required=True, help="schedule YAML to write")
    p.add_argument(
        "--cost",
        default="flops",
        help="cost in CA-MSE: flops (analytic, the default: independent of machine load) or measured",
    )
    p.add_argument(
        "--metric",
        default="model",
        help="model (CA-MSE of the whole gradient, the default), groups (each parameter group's in "
        "units of its own full-input noise, averaged: no group's raw gradient size decides), descent "
        "(the full-input loss decrease of one AdamW step on a batch, per unit cost) or lookahead (the "
        "held-out full-input loss decrease after a few steps, per unit cost: reports of a run with "
        "train.grad_error_lookahead)",
    )
    p.set_defaults(func=_plan)

    p = sub.add_parser("diagnose", help="plot attention entropy and condition numbers of runs")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("-o", "--output", default="diagnostics.png", help="PNG to write (default diagnostics.png)")
    p.set_defaults(func=_diagnose)

    p = sub.add_parser("plot", help="picture of runs: loss, lr, compression and kNN against budget")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("-o", "--output", default="runs.png", help="PNG to write (default runs.png)")
    p.set_defaults(func=_plot)

    p = sub.add_parser("defaults", help="print every recipe key with its default and meaning")
    p.add_argument("--markdown", action="store_true", help="as Markdown tables (docs/recipe-keys.md)")
    p.set_defaults(func=_defaults)
    return parser


WRITE_REFUSALS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)


class Terminated(BaseException):
    """SIGTERM outside a training loop (which checkpoints on it instead): not an `Exception`, so that
    no handler of errors takes it for one."""


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed on one line
        return exc.code
    try:
        return args.func(args)
    except (KeyboardInterrupt, Terminated) as exc:
        signal_name = "SIGTERM" if isinstance(exc, Terminated) else "Ctrl-C"
        print(f"accelvit: stopped by {signal_name}: {args.command} did not finish", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    except ConfigError as exc:
        print(f"accelvit: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        from accelvit.checkpoint import SaveError
        from accelvit.distributed import PeerTimeout
        from accelvit.train import NonFiniteError

        if isinstance(exc, (NonFiniteError, SaveError, PeerTimeout)):
            print(f"accelvit: stopped: {exc}", file=sys.stderr)
            return 1
        raise
    except OSError as exc:  # the machine refused a write: a full disk, a read-only mount, a quota
        if exc.errno not in WRITE_REFUSALS:
            raise
        print(f"accelvit: stopped: {exc.strerror}: {exc.filename}", file=sys.stderr)
        return 1


class _BestEffort:
    """A console stream whose writes never fail: output is a courtesy, the run is not. (Ctrl-C on
    `accelvit pretrain ... | tee log` stops tee first; the next print must not cost the checkpoint.)"""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError:  # BrokenPipeError and the like
            self._detach()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError:
            self._detach()

    def _detach(self) -> None:
        # point the descriptor at /dev/null, so that Python's own flush at exit does not fail either
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def run() -> None:
    """The console entry point: `main` with output that a closed pipe cannot break."""
    sys.stdout, sys.stderr = _BestEffort(sys.stdout), _BestEffort(sys.stderr)
    signal.signal(signal.SIGTERM, _terminate)  # a training loop puts its own handler in while it runs
    sys.exit(main())


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


if __name__ == "__main__":
    run()
