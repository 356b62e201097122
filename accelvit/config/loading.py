"""Reading a recipe: YAML with `!include` and duplicate-key and alias-bomb checks, the schedule file,
`--set` overrides, the launcher's settings, then coercion and validation.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import yaml

from accelvit.config.coercion import _hints, _unknown, _unwrap_optional, from_dict
from accelvit.config.schema import (
    COMPILE_KEEP_BUCKETS,
    Config,
    ConfigError,
    _excerpt,
)
from accelvit.config.validation import validate


def load_config(path: str | Path | None, overrides: list[str] = (), check_paths: bool = True) -> Config:
    """Read a recipe, apply `section.key=value` overrides and validate the result.

    `check_paths=False` skips checks of the file system (for commands that read no data).

    Raises:
        ConfigError: one line naming the file, key or value at fault.
    """
    raw = read_yaml(path) if path is not None else {}
    for item in overrides:
        apply_override(raw, item)
    _merge_schedule_file(raw)
    _take_launcher_settings(raw)
    train = raw.get("train")
    if isinstance(train, dict) and train.get("budget") is not None and "steps" not in train:
        train["steps"] = None  # a budget replaces the default number of steps
    cfg = from_dict(Config, raw, "")
    if cfg.train.compile != "no" and cfg.schedule.keep_buckets is None:
        cfg.schedule.keep_buckets = COMPILE_KEEP_BUCKETS  # written into the run's recipe.yaml
    validate(cfg, check_paths)
    return cfg


# What `accelerate launch` (its flags or `accelerate config`) passes to the processes, as ACCELERATE_*
# variables an Accelerator would pick up silently, and that accelvit's loop does not do.
UNSUPPORTED_LAUNCHER = {
    "ACCELERATE_DYNAMO_BACKEND": (
        "--dynamo_backend (torch.compile of the whole model) is not supported: a curriculum would "
        "recompile at every new patch size and keep ratio; use train.compile instead"
    ),
    "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": (
        "--gradient_accumulation_steps is not supported: the loop steps the optimizer every batch; raise "
        "train.batch_size or the number of processes instead"
    ),
    "ACCELERATE_USE_FSDP": "FSDP is not supported: accelvit trains with DDP (the ViTs it targets fit a GPU)",
    "ACCELERATE_USE_DEEPSPEED": "DeepSpeed is not supported: accelvit trains with DDP",
    "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM is not supported: accelvit trains with DDP",
}


def _asks(name: str, value: str) -> bool:
    """Whether a launcher variable asks for its feature: a backend other than no, more than one
    accumulation step, a true flag."""
    value = value.strip().lower()
    if name == "ACCELERATE_DYNAMO_BACKEND":
        return value not in ("", "no")
    if name == "ACCELERATE_GRADIENT_ACCUMULATION_STEPS":
        return value not in ("", "0", "1")
    return value in ("1", "true", "yes")


def _take_launcher_settings(raw: dict) -> None:
    """Refuse the launcher settings the loop does not do; take its mixed precision when the recipe
    sets none, and refuse one that contradicts the recipe's."""
    for name, why in UNSUPPORTED_LAUNCHER.items():
        if _asks(name, os.environ.get(name, "")):
            raise ConfigError(f"accelerate launch: {why} ({name}={_excerpt(os.environ[name])})")
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    train = raw.setdefault("train", {})
    if launcher == "no" or not isinstance(train, dict):
        return
    recipe = train.get("precision")
    if recipe is None:
        train["precision"] = launcher
    elif recipe != launcher:
        raise ConfigError(
            f"train.precision = {_excerpt(recipe)}: the launcher asks {launcher} (accelerate launch "
            "--mixed_precision or accelerate config); set one of them"
        )


MAX_INCLUDE_DEPTH = 8
MAX_YAML_NODES = 100_000  # a recipe is small; more nodes after alias expansion is an alias bomb


def read_yaml(path: str | Path, what: str = "recipe", _chain: tuple[Path, ...] = ()) -> dict:
    """A YAML mapping; `!include FILE` inserts another file's mapping.

    An included file is named relative to the including file and must lie inside the folder of the
    recipe the chain started from (no absolute paths, no escaping with ..); include cycles, chains
    deeper than MAX_INCLUDE_DEPTH, files that are not UTF-8 and alias expansions past MAX_YAML_NODES
    are refused with one line.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    resolved = path.resolve()
    if resolved in _chain:
        cycle = " -> ".join(p.name for p in (*_chain, resolved))
        raise ConfigError(f"{path}: !include cycle ({cycle})")
    if len(_chain) >= MAX_INCLUDE_DEPTH:
        raise ConfigError(f"{path}: !include chain deeper than {MAX_INCLUDE_DEPTH} files")
    chain = (*_chain, resolved)
    root = chain[0].parent

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
            # YAML lets a later key silently replace an earlier one: in a recipe that is a mistake
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise ConfigError(
                        f"{path}: line {key_node.start_mark.line + 1}: key {_excerpt(key)} given twice "
                        f"(first on line {seen[key] + 1})"
                    )
                seen[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep=deep)

    def include(loader: yaml.SafeLoader, node: yaml.Node) -> dict:
        name = loader.construct_scalar(node)
        target = path.parent / name
        if Path(name).is_absolute() or not target.resolve().is_relative_to(root):
            raise ConfigError(f"{path}: !include {_excerpt(name)}: must name a file inside {root}")
        return read_yaml(target, "included", chain)

    Loader.add_constructor("!include", include)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        loader = Loader(text)
        try:
            node = loader.get_single_node()
            if node is not None and _expanded_size(node, {}) > MAX_YAML_NODES:
                raise ConfigError(f"{path}: YAML aliases expand to more than {MAX_YAML_NODES} nodes")
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}:{where}: malformed YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a {what} must be a mapping, got {type(data).__name__}")
    return data


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Nodes of the document with every alias expanded (aliases share nodes; the memo keeps it linear)."""
    key = id(node)
    if key not in memo:
        memo[key] = 1  # a recursive structure counts once per visit
        if isinstance(node, yaml.SequenceNode):
            memo[key] = 1 + sum(_expanded_size(n, memo) for n in node.value)
        elif isinstance(node, yaml.MappingNode):
            memo[key] = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    return memo[key]


def _merge_schedule_file(raw: dict) -> None:
    """Merge `schedule.file` into the schedule section; the resolved recipe then no longer needs it."""
    schedule = raw.get("schedule")
    if not isinstance(schedule, dict) or not schedule.get("file"):
        return
    loaded = read_yaml(schedule["file"], "schedule.file")
    loaded = loaded.get("schedule", loaded)  # a whole recipe or just the schedule section
    if not isinstance(loaded, dict):
        raise ConfigError(f"schedule.file {schedule['file']}: expected a mapping of schedule keys")
    raw["schedule"] = {**schedule, **loaded, "file": None}


def apply_override(raw: dict, item: str) -> None:
    """Apply one `--set section.key=value` (value parsed as YAML) to the raw recipe dict."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"--set {key}: value {text!r} is not valid YAML") from None
    parts = key.strip().split(".")
    _check_path(parts, f"--set {key}")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            # A ramp given as a plain number is widened so that a sub-key can be set.
            child = {"shape": "constant", "start": child} if isinstance(child, (int, float)) else {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _check_path(parts: list[str], where: str) -> None:
    cls: Any = Config
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"{where}: {'.'.join(parts[:i])} has no sub-keys")
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            raise ConfigError(_unknown(".".join(parts[: i + 1]), part, names, where))
        cls = _hints(cls)[part]
        cls = _unwrap_optional(cls)
