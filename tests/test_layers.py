"""The package's layering: every import points down, nothing imports in a circle, and validating a
recipe needs no model library. The floors are the architecture (docs/development.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "accelvit"

FLOORS = {
    "accelvit": 0,  # __version__
    "accelvit.setting": 0,
    "accelvit.merge": 0,
    "accelvit.distributed": 0,
    "accelvit.monitor": 0,
    "accelvit.augment": 0,
    "accelvit.objectives.momentum": 0,
    "accelvit.nonfinite": 0,
    "accelvit.config.schema": 1,
    "accelvit.config.coercion": 1.1,
    "accelvit.config.validation": 1.1,
    "accelvit.config.describe": 1.1,
    "accelvit.config.loading": 1.2,
    "accelvit.config": 1.5,  # the package: its modules' public names
    "accelvit.schedule": 2,
    "accelvit.images": 2,
    "accelvit.shards": 3,
    "accelvit.data": 4,
    "accelvit.arch": 2,
    "accelvit.checkpoint": 2,
    "accelvit.plan": 2,
    "accelvit.budget": 3,
    "accelvit.backbone": 4,
    "accelvit.compress": 4,
    "accelvit.report": 4,
    "accelvit.metrics": 4,
    "accelvit.objectives.simclr": 5,
    "accelvit.objectives.mocov3": 5,
    "accelvit.objectives.dino": 5,
    "accelvit.objectives": 6,
    "accelvit.export": 7,
    "accelvit.gradbias": 7,
    "accelvit.timing": 7,
    "accelvit.evaluate": 8,
    "accelvit.diagnostics": 9,
    "accelvit.embed": 9,
    "accelvit.trackers": 9,
    "accelvit.step": 7,
    "accelvit.build": 10,
    "accelvit.lookahead": 10.5,
    "accelvit.train": 11,
    "accelvit.cli": 12,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> list[tuple[str, str, bool, str]]:
    """(module, imported accelvit module, inside a function, source line) for every import."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        source = path.read_text()
        tree = ast.parse(source)
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "accelvit":
                line = source.splitlines()[node.lineno - 1]
                targets = [node.module]
                if node.module == "accelvit.objectives" and module_name(path) == "accelvit.objectives":
                    targets = []  # the registry's own submodules
                for target in targets:
                    found.append((module_name(path), target, id(node) not in top, line))
    return found


def test_every_module_has_a_floor():
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    assert modules == set(FLOORS)


def test_every_import_points_down():
    upward = [
        f"{module} (floor {FLOORS[module]}) imports {target} (floor {FLOORS[target]})"
        for module, target, _, _ in imports()
        if module != target and FLOORS[target] >= FLOORS[module]
    ]
    assert not upward


def test_no_function_local_imports_outside_the_cli_without_a_reason():
    hidden = [
        f"{module}: {line.strip()}"
        for module, _, local, line in imports()
        if local and module != "accelvit.cli" and "#" not in line
    ]
    assert not hidden


def test_validating_a_recipe_imports_no_model_library(tiny_recipe):
    code = (
        "import sys; from accelvit.config import load_config; "
        f"load_config({str(tiny_recipe)!r}); "
        "print(sorted(m for m in ('torch', 'timm', 'lightly') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_objective_names_are_the_registry():
    import typing

    from accelvit.config import ObjectiveName
    from accelvit.objectives import OBJECTIVES

    assert set(typing.get_args(ObjectiveName)) == set(OBJECTIVES)


def test_start_up_imports_no_plotting_or_lightning():
    # lightly's kNN helper imports pytorch_lightning and torchmetrics, its debug module matplotlib:
    # ~1.5 s of CPU a command, paid only where they are used
    code = (
        "import sys, accelvit.cli, accelvit.train, accelvit.evaluate, accelvit.export, accelvit.embed; "
        "print(sorted(m for m in ('pytorch_lightning', 'torchmetrics', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
