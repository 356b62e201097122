"""Run directories and checkpoints: atomic save, verified load, resume.

RUN_DIR/
  recipe.yaml          the resolved recipe; `accelvit pretrain RUN_DIR/recipe.yaml` reproduces the run
  metrics.jsonl        one JSON line per `train.log_every` steps
  grad_error/step_N.*  gradient-bias reports taken during training (`train.grad_error_at`, adaptive stages)
  costs.json           measured step costs (`cost.model: measured`), reused on resume
  schedule_decisions.jsonl  adaptive schedule: one line per stage decision
  diagnostics.jsonl    attention entropy and condition numbers per block (train.diagnostics_every)
  checkpoints/step_N/  accelerate's `save_state` (model, optimizer, RNG states of every process)
                       + trainer_state.json (TrainState) + identity.json (accelvit version, model
                       and objective) + manifest.json (files, sizes, SHA-256)

A checkpoint is written under a temporary name and renamed into place once complete, so a crash
mid-save never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from accelvit import __version__
from accelvit.config import Config, ConfigError, dump_config, load_config
from accelvit.distributed import any_process, process_state

RECIPE = "recipe.yaml"
METRICS = "metrics.jsonl"
GRAD_ERROR = "grad_error"
COSTS = "costs.json"
DECISIONS = "schedule_decisions.jsonl"
DIAGNOSTICS = "diagnostics.jsonl"
CHECKPOINTS = "checkpoints"
STATE = "trainer_state.json"
IDENTITY = "identity.json"
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"


@dataclass
class TrainState:
    """Everything the loop needs besides model, optimizer and RNGs: the schedule is a function of it."""

    step: int = 0
    images_seen: int = 0
    budget_spent: float = 0.0  # budget units, training steps and estimator runs together
    estimator_spent: float = 0.0  # the part of budget_spent the adaptive schedule's estimator used
    grad_error_done: list[float] = field(default_factory=list)  # train.grad_error_at points taken
    decisions: list[dict] = field(default_factory=list)  # adaptive schedule, one per stage
    skipped: int = 0  # steps skipped for a non-finite loss or gradient (train.on_nonfinite: skip)
    skipped_in_row: int = 0
    bad_files: int = 0  # unreadable images skipped (data.on_bad_file: skip), counted per read
    bad_file_examples: list[str] = field(default_factory=list)  # the first few, 'PATH: reason'
    # the loss summed since the last log line (mean over processes), so that a resumed run logs the
    # values an uninterrupted one does when log_every does not divide the checkpoint's step
    partial_log: dict = field(default_factory=dict)
    # the newest line of metrics.jsonl, written again on resume if a crash tore it after the
    # checkpoint (which is fsynced) had already been saved
    last_log: dict | None = None


def run_recipe(run_dir: Path, overrides: list[str] = (), check_paths: bool = True) -> Config:
    """The resolved recipe a run directory was created with (`overrides` on top); a folder that is no
    run directory gets one line naming it."""
    if not (run_dir / RECIPE).is_file():
        raise ConfigError(f"'{run_dir}' is not a run directory (no {RECIPE})")
    return load_config(run_dir / RECIPE, list(overrides), check_paths=check_paths)


def check_run_dir(run_dir: Path, overwrite: bool = False) -> None:
    """Refuse, before anything is written, a folder that holds a run (unless `overwrite`) or, with
    `overwrite`, a folder that is not a run directory."""
    if (run_dir / RECIPE).exists() and not overwrite:
        raise ConfigError(
            f"run directory '{run_dir}' already holds a run: continue it with "
            f"`accelvit resume {run_dir}` (from step 0 if it has no checkpoint yet), or pass --overwrite "
            "to start over"
        )
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"-o {run_dir}: exists and is not a folder")
    parent = next((p for p in run_dir.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise ConfigError(f"-o {run_dir}: {parent} is not a folder")
    if not _writable(run_dir if run_dir.is_dir() else parent):
        raise ConfigError(f"-o {run_dir}: not writable")
    if (
        overwrite
        and run_dir.exists()
        and not (run_dir / RECIPE).is_file()
        and _holds_more_than_a_lock(run_dir)
    ):
        # --overwrite replaces a run, never a folder that merely happens to be named
        raise ConfigError(f"--overwrite: '{run_dir}' is not an accelvit run directory (no {RECIPE})")


def _holds_more_than_a_lock(run_dir: Path) -> bool:
    return any(p.name != LOCK for p in run_dir.iterdir())


def create_run_dir(run_dir: Path, cfg: Config, overwrite: bool = False) -> None:
    """Create RUN_DIR with its resolved recipe; refuse a folder that already holds a run.

    With `overwrite` the caller holds the run's lock (`run_lock`), so a run that another process
    still trains is refused there and never deleted; the old run's files go, the lock stays.
    Every process checks, then the main process writes, so all of them fail or none does.
    """
    processes = process_state()
    check_run_dir(run_dir, overwrite)
    processes.wait_for_everyone()
    if processes.is_main_process:
        if overwrite and run_dir.is_dir():
            for path in run_dir.iterdir():
                if path.name != LOCK:
                    _remove(path)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / RECIPE, dump_config(cfg))
    processes.wait_for_everyone()


def check_output(path: Path, what: str = "-o") -> Path:
    """Refuse, before any work, an output that is not a regular file (a folder, a device) or that
    cannot be written where it is to go."""
    if path.exists() and not path.is_file():
        raise ConfigError(f"{what} {path}: exists and is not a regular file")
    parent = next((p for p in path.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise ConfigError(f"{what} {path}: {parent} is not a folder")
    if not _writable(parent) or (path.exists() and not _writable(path)):
        raise ConfigError(f"{what} {path}: not writable")
    return path


def _writable(path: Path) -> bool:
    """Whether `path` (a file, or a folder to create one in) takes a write, tried for real: os.access
    answers yes to root on immutable files and folders, and misses other refusals (quotas, mounts)."""
    try:
        if path.is_dir():
            with tempfile.TemporaryFile(dir=path):
                pass
        else:
            with open(path, "r+b"):  # opened for writing, neither truncated nor changed
                pass
    except OSError:
        return False
    return True


def discard_unstarted(run_dir: Path, before: set[Path] | None) -> None:
    """Remove what a run that stopped on bad input before its first step wrote (no checkpoint, no log
    line), so that it leaves nothing behind; `before`: the folder's entries before the command, None
    if it created the folder. A run that took a step is kept."""
    if list_checkpoints(run_dir) or (run_dir / METRICS).exists():
        return
    if before is None:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for path in set(run_dir.iterdir()) - before:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


LOCK = ".lock"


class RunInUse(ConfigError):
    """Another process holds the run's lock."""


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold RUN_DIR's exclusive lock while a command writes into it (the main process takes it for
    all; the folder is created if need be); a second command on the same run gets one line naming
    the holder, not interleaved files.

    A POSIX record lock (`lockf`), not `flock`: it belongs to the process, so the loader workers it
    forks do not inherit it, and a `kill -9` frees the run at once instead of when the last orphaned
    worker exits.
    """
    if not process_state().is_main_process:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK, "a+") as f:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # EACCES or EAGAIN: held by another process
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise RunInUse(f"'{run_dir}' is in use by {holder}; wait for it or stop it first") from None
        f.seek(0)
        f.truncate()
        f.write(f"accelvit pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary name beside `path` to write a file or folder to; renamed to `path` when the block
    ends normally, removed when it raises, so that `path` is whole or untouched."""
    tmp = path.with_name(TMP_PREFIX + path.name)
    _remove(tmp)  # a leftover of a write that was killed
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():  # a link is removed, never what it points to
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


class DamagedCheckpoint(ConfigError):
    """A checkpoint that cannot be used as it is on disk; resuming passes over it to the one before."""


def checkpoint_step(path: Path) -> int:
    return int(path.name.removeprefix("step_"))


def _checkpoint_folders(run_dir: Path) -> list[Path]:
    """The run's own step_N folders, oldest first: a link (to anywhere) or any other name is not
    one of them, so it is neither resumed from, written through, nor pruned."""
    folder = run_dir / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [
        p for p in folder.iterdir() if re.fullmatch(r"step_\d+", p.name) and p.is_dir() and not p.is_symlink()
    ]
    return sorted(found, key=checkpoint_step)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run (step_N folders with a manifest), oldest first."""
    return [p for p in _checkpoint_folders(run_dir) if (p / MANIFEST).is_file()]


def check_resumable(run_dir: Path) -> None:
    """Refuse, before any work, a run that could not save: a run directory that refuses writes, or
    a checkpoints/ that is not a folder (it would train, then fail at the first save)."""
    if not _writable(run_dir):
        raise ConfigError(f"'{run_dir}': not writable")
    folder = run_dir / CHECKPOINTS
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise ConfigError(f"'{folder}' is not a folder of the run: move it away to resume the run")


def remove_leftovers(run_dir: Path) -> None:
    """Remove, with a warning, what interrupted saves and prunes left: temporary folders, and
    step_N folders without a manifest older than the newest complete checkpoint (a prune removes
    the manifest first). One without a manifest that is newer is warned about and kept: its
    manifest was lost, and its files are for the user to inspect."""
    folder = run_dir / CHECKPOINTS
    if not folder.is_dir():
        return
    for leftover in folder.glob(TMP_PREFIX + "*"):
        warnings.warn(f"removing incomplete checkpoint {leftover}", stacklevel=3)
        _remove(leftover)
    for link in (p for p in folder.iterdir() if p.is_symlink()):
        warnings.warn(f"{link} is a link, not a checkpoint of this run: ignored", stacklevel=3)
    complete = list_checkpoints(run_dir)
    newest = checkpoint_step(complete[-1]) if complete else -1
    for path in _checkpoint_folders(run_dir):
        if (path / MANIFEST).is_file():
            continue
        if checkpoint_step(path) < newest:
            warnings.warn(f"removing {path}, left without its manifest by an interrupted prune", stacklevel=3)
            _remove(path)
        else:
            warnings.warn(
                f"checkpoint {path} has no {MANIFEST}: not resumed from, kept for inspection", stacklevel=3
            )


def prune(path: Path) -> None:
    """Remove an old checkpoint, its manifest first: a prune cut short leaves a folder that is
    recognisably incomplete (`remove_leftovers`), never one that looks damaged."""
    (path / MANIFEST).unlink(missing_ok=True)
    _remove(path)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint whose files match its manifest.

    Leftovers of interrupted saves are removed with a warning; a damaged checkpoint (a file missing
    or of another size than its manifest says) is passed over with a warning and kept for inspection.
    """
    remove_leftovers(run_dir)
    for path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
        except DamagedCheckpoint as exc:
            warnings.warn(f"{exc}; trying the one before", stacklevel=2)
            continue
        return path
    return None


def run_identity(cfg: Config) -> dict:
    """What a checkpoint's meaning depends on: the accelvit version, the model and the objective."""
    return {
        "accelvit": __version__,
        "model": dataclasses.asdict(cfg.model),
        "objective": dataclasses.asdict(cfg.objective),
    }


def check_identity(path: Path, identity: dict) -> None:
    """Refuse a checkpoint of another accelvit major version, or of another model or objective."""
    file = path / IDENTITY
    if not file.is_file():
        return
    saved = json.loads(file.read_text())
    if saved["accelvit"].split(".")[0] != identity["accelvit"].split(".")[0]:
        raise ConfigError(
            f"checkpoint '{path}' was written by accelvit {saved['accelvit']}, which this accelvit "
            f"{identity['accelvit']} cannot resume (another major version)"
        )
    changed = [
        f"{section}.{key} ({saved[section].get(key)!r} -> {value!r})"
        for section in ("model", "objective")
        for key, value in identity[section].items()
        if saved[section].get(key) != value
    ]
    if changed:
        raise ConfigError(
            f"resume refused: the recipe changes {', '.join(changed)} since checkpoint '{path}'; "
            "restore the recipe or start a new run"
        )


class SaveError(RuntimeError):
    """A checkpoint could not be written; earlier checkpoints are untouched."""


def save_checkpoint(
    accelerator: Accelerator, run_dir: Path, state: TrainState, keep: int, identity: dict | None = None
) -> Path:
    """Write RUN_DIR/checkpoints/step_N atomically on every process; keep the newest `keep`.

    The checkpoint is written under a temporary name and renamed into place once complete, and older
    ones are removed only after that, so an error (disk full, I/O) leaves the earlier checkpoints as
    they were. Every process then raises `SaveError` together.
    """
    final = run_dir / CHECKPOINTS / f"step_{state.step}"
    tmp = final.with_name(TMP_PREFIX + final.name)
    main = accelerator.is_main_process

    def phase(fn, everyone: bool = False) -> None:
        error = None
        if everyone or main:
            try:
                fn()
            except Exception as exc:  # OSError, or torch's RuntimeError and safetensors' error wrapping one
                error = exc
        if any_process(accelerator, error is not None):
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            previous = list_checkpoints(run_dir) if main else []
            kept = f"newest intact checkpoint: {previous[-1]}" if previous else "no earlier checkpoint"
            why = _write_failure(error, final.parent) if error else "failed on another process"
            raise SaveError(f"could not write checkpoint {final}: {why}; {kept}")
        accelerator.wait_for_everyone()

    def start() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    def finish() -> None:
        (tmp / STATE).write_text(json.dumps(dataclasses.asdict(state)))
        if identity is not None:
            (tmp / IDENTITY).write_text(json.dumps(identity, indent=1))
        files = {}
        for p in sorted(tmp.iterdir()):
            if p.is_file():
                _fsync_file(p)  # every file is on disk before the manifest that vouches for it
                files[p.name] = {"size": p.stat().st_size, "sha256": file_digest(p)}
        write_atomic(tmp / MANIFEST, json.dumps({"files": files}, indent=1))
        _fsync_dir(tmp)
        _clear_the_way(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)

    phase(start)
    phase(lambda: accelerator.save_state(str(tmp)), everyone=True)  # every process saves its RNG state
    phase(finish)
    if main:
        for old in list_checkpoints(run_dir)[:-keep]:
            prune(old)
    accelerator.wait_for_everyone()
    return final


def _clear_the_way(final: Path) -> None:
    """Make room for a checkpoint at `final`: a link there goes (never what it points to); a
    complete, intact checkpoint of the same step is replaced (a stop right after a checkpoint);
    anything else there (a damaged checkpoint, one whose manifest was lost) is moved aside, never
    deleted."""
    if final.is_symlink() or final.is_file():
        final.unlink()
    elif final.is_dir():
        try:
            verify_checkpoint(final)
            shutil.rmtree(final)
        except DamagedCheckpoint:
            aside = final.with_name(f"damaged-{final.name}-{int(time.time())}")
            warnings.warn(f"moving {final} aside to {aside}: it was not a complete checkpoint", stacklevel=4)
            os.replace(final, aside)


def _write_failure(error: Exception, folder: Path) -> str:
    """What went wrong in a save, in words: torch's writer reports a full disk as an assertion
    ("enforce fail ... unexpected pos"), so a folder with no room left is named as such."""
    text = _first_line(error)
    if not isinstance(error, OSError) and shutil.disk_usage(folder).free < 1 << 20:
        return f"No space left on device ({text[:80]})"
    return text


def file_digest(path: Path) -> str:
    """SHA-256 of a file's content (the manifest's check against silent corruption)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify_checkpoint(path: Path) -> None:
    """Check that every file the manifest lists is there with its recorded size and content hash.

    (Manifests written before content hashes list sizes only; those are checked by size.) The hash
    catches corruption, not tampering: whoever can write the checkpoint can write its manifest too,
    which is why nothing in a checkpoint is read in a way that could run code (`safe_load`).
    """
    if not (path / MANIFEST).is_file():
        raise DamagedCheckpoint(f"checkpoint '{path}' does not exist or is incomplete (no {MANIFEST})")
    try:
        listed = json.loads((path / MANIFEST).read_text())["files"]
        entries = {
            name: (entry, None) if isinstance(entry, int) else (entry["size"], entry["sha256"])
            for name, entry in listed.items()
        }
    except (ValueError, KeyError, TypeError, AttributeError):
        raise DamagedCheckpoint(f"checkpoint '{path}' is damaged: unreadable {MANIFEST}") from None
    for name, (size, digest) in entries.items():
        actual = (path / name).stat().st_size if (path / name).is_file() else None
        if actual != size:
            raise DamagedCheckpoint(
                f"checkpoint '{path}' is damaged: {name} has {actual} bytes, manifest says {size}"
            )
        if digest is not None and file_digest(path / name) != digest:
            raise DamagedCheckpoint(f"checkpoint '{path}' is damaged: {name} changed since it was saved")


def safe_load(path: Path):
    """`torch.load` that cannot run code: tensors, numbers, containers and the numpy types of RNG
    states only (accelerate's own loader, which `load_state` uses for every file it reads)."""
    from accelerate.utils import load

    return load(path, map_location="cpu", weights_only=True)


def load_checkpoint(
    accelerator: Accelerator, path: Path, model: torch.nn.Module, identity: dict | None = None
) -> TrainState:
    """Restore `model` (prepared), the optimizer and RNG states from `path`; returns the loop state.

    Raises DamagedCheckpoint for anything that makes the checkpoint unusable as it is on disk (a
    file that does not load, a state of unknown keys, weights that are not finite), ConfigError for
    a checkpoint that is intact but not this recipe's.
    """
    verify_checkpoint(path)
    if identity is not None:
        check_identity(path, identity)
    try:
        state = TrainState(**json.loads((path / STATE).read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise DamagedCheckpoint(f"checkpoint '{path}' is damaged: unreadable {STATE} ({exc})") from None
    if state.step != checkpoint_step(path):
        raise DamagedCheckpoint(f"checkpoint '{path}' is damaged: its {STATE} says step {state.step}")
    try:
        accelerator.load_state(str(path))
    except RuntimeError as exc:
        if _does_not_fit(exc):  # another architecture's weights (a recipe edited, identity.json gone)
            raise ConfigError(
                f"resume refused: the weights of checkpoint '{path}' do not fit the recipe's model "
                f"({_first_line(exc)}); restore the recipe or start a new run"
            ) from None
        raise DamagedCheckpoint(f"checkpoint '{path}' is damaged: {_first_line(exc)}") from None
    except Exception as exc:  # pickle's refusals (UnpicklingError), truncated or foreign files
        raise DamagedCheckpoint(
            f"checkpoint '{path}' is damaged: {type(exc).__name__}: {_first_line(exc)}"
        ) from None
    check_rng_restored(path, accelerator.process_index)
    broken = not all(bool(torch.isfinite(p).all()) for p in model.parameters())
    if any_process(accelerator, broken):  # never resumed, so never named a "last good state" later
        raise DamagedCheckpoint(f"checkpoint '{path}' is damaged: its weights are not finite")
    return state


def _does_not_fit(exc: RuntimeError) -> bool:
    return any(s in str(exc) for s in ("size mismatch", "Missing key", "Unexpected key"))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def check_rng_restored(path: Path, process: int) -> None:
    """Raise DamagedCheckpoint unless this process's RNG state now equals the one saved in `path`.

    accelerate's `load_state` only logs a failed RNG load at info level and goes on, and the resume
    is then silently not exact. A state saved by fewer processes than now resume has none for this
    one: a warning, since such a resume cannot be exact anyway.
    """
    rng_file = path / f"random_states_{process}.pkl"
    if not rng_file.is_file():
        warnings.warn(f"{path} holds no RNG state of process {process}: it starts afresh", stacklevel=2)
        return
    try:
        saved = safe_load(rng_file)["torch_manual_seed"]
        restored = torch.equal(saved, torch.get_rng_state())
    except Exception as exc:  # any unpickling or format error: the file is not an RNG state
        raise DamagedCheckpoint(
            f"checkpoint '{path}' is damaged: {rng_file.name} cannot be loaded ({exc!r:.60})"
        ) from None
    if not restored:
        raise DamagedCheckpoint(
            f"checkpoint '{path}' is damaged: {rng_file.name} was not restored; the resume would differ"
        )


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl; a line still being written (a running run) is left out."""
    return read_records(run_dir / METRICS)


def read_records(path: Path) -> list[dict]:
    """The JSON objects of a log file, one a line; a line still being written by a running run, or
    torn by a crash, is left out."""
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                records.append(record)
    return records


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop log lines written after the checkpoint of `step` that a run resumes from.

    metrics.jsonl lines name the step they end (kept up to `step`); diagnostics.jsonl lines the step
    they precede, so the one of `step` itself is taken again.
    """
    for name, last in ((METRICS, step), (DIAGNOSTICS, step - 1)):
        path = run_dir / name
        if path.exists():
            kept = []
            for line in path.read_text().splitlines(keepends=True):
                try:
                    record = json.loads(line) if line.strip() else None
                except ValueError:  # a line torn by a crash mid-append
                    warnings.warn(f"{path}: dropping a line that is not JSON: {line[:60]!r}", stacklevel=2)
                    continue
                if record is not None and record["step"] <= last:
                    kept.append(line if line.endswith("\n") else line + "\n")
            write_atomic(path, "".join(kept))


def save(
    accelerator: Accelerator, run_dir: Path, state: TrainState, keep: int, on_error: str, identity: dict
) -> Path | None:
    """Checkpoint; on a write error stop (SaveError) or, with `on_error` warn, warn and go on."""
    try:
        return save_checkpoint(accelerator, run_dir, state, keep, identity)
    except SaveError as exc:
        if on_error == "stop":
            raise
        if accelerator.is_main_process:
            warnings.warn(f"{exc}; training goes on (train.on_save_error: warn)", stacklevel=2)
        return None


def resume_state(
    accelerator: Accelerator, run_dir: Path, model: torch.nn.Module, identity: dict
) -> TrainState | None:
    """Model, optimizer and RNG states from the newest checkpoint that loads, the log files cut back
    to it (a damaged one is passed over with a warning, never deleted); None for a run stopped before
    its first checkpoint (it starts again from step 0, its logs emptied)."""
    check_resumable(run_dir)
    remove_leftovers(run_dir)
    candidates = list_checkpoints(run_dir)  # each verified once, by load_checkpoint
    state = None
    for checkpoint in reversed(candidates):
        try:
            state = load_checkpoint(accelerator, checkpoint, model, identity)
            break
        except DamagedCheckpoint as exc:
            if accelerator.is_main_process:
                warnings.warn(f"{exc}; trying the one before", stacklevel=2)
    if state is None and candidates:
        raise ConfigError(f"'{run_dir}': every checkpoint is damaged (see the warnings); nothing resumed")
    if state is None:
        if accelerator.is_main_process:
            truncate_metrics(run_dir, 0)
            print(f"{run_dir} has no checkpoint yet: starting it from step 0", flush=True)
        return None
    if accelerator.is_main_process:
        truncate_metrics(run_dir, state.step)
        _restore_last_log(run_dir, state.last_log)
        write_decisions(run_dir, state.decisions)
        print(f"resuming {run_dir} from step {state.step}", flush=True)
    return state


def _restore_last_log(run_dir: Path, record: dict | None) -> None:
    """Put back the checkpoint's newest log line where a crash tore it (the log is appended to
    without fsync, the checkpoint is fsynced)."""
    path = run_dir / METRICS
    if record is not None and record not in (read_records(path) if path.exists() else []):
        warnings.warn(
            f"{path}: writing again the line of step {record['step']}, lost in a crash", stacklevel=3
        )
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def write_decisions(run_dir: Path, decisions: list[dict]) -> None:
    write_atomic(run_dir / DECISIONS, "".join(json.dumps(d) + "\n" for d in decisions))
