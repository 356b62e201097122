"""README.md and docs/ cannot rot: their links and anchors resolve, their `accelvit` commands are
accepted (and run at a tiny size where they can), their Python snippets run, and the recipe key
reference is what the schema prints."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from accelvit.cli import build_parser, main
from accelvit.config import defaults_markdown
from tests.conftest import TINY, write_recipe

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def prose(text: str) -> str:
    return FENCE.sub("", text)


def anchors(page: Path) -> set[str]:
    text = page.read_text()
    return {slug(h) for h in re.findall(r"^#+ (.*)$", prose(text), re.M)} | set(
        re.findall(r'<a id="([^"]+)"', text)
    )


def blocks(lang: str | None = None) -> list[tuple[Path, str, str]]:
    """(page, language, body) of every fenced block."""
    return [(p, m.group(1), m.group(2)) for p in PAGES for m in FENCE.finditer(p.read_text())
            if lang is None or m.group(1) == lang]  # fmt: skip


def accelvit_commands() -> list[tuple[Path, list[str]]]:
    """Every `accelvit ...` (or `-m accelvit.cli ...`) command of the fenced shell blocks, as argv
    after the program name (comments, continuations and `bash -c '...'` wrappers undone)."""

    def commands(line: str) -> list[list[str]]:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        words, found = list(lexer), []
        for i, word in enumerate(words):
            if " " in word and "accelvit" in word:  # a quoted command line (bash -c '...')
                found += commands(word)
            elif word == "accelvit" or word.endswith("/accelvit") or (word == "accelvit.cli" and words[i - 1] == "-m"):
                end = next((j for j in range(i + 1, len(words)) if words[j] in ("&&", "||", ";", "|")), len(words))
                found.append(words[i + 1 : end])
        return found

    return [
        (page, argv)
        for page, _, body in blocks("bash")
        for line in re.sub(r"\\\n\s*", " ", body).splitlines()
        if not line.lstrip().startswith("#")
        for argv in commands(line)
    ]


def test_every_link_and_anchor_resolves():
    broken = []
    for page in PAGES:
        for target in LINK.findall(prose(page.read_text())):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{page.name}: {target} (no such anchor)")
    assert broken == []


def test_the_readme_is_a_front_door():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    linked = {Path(t.partition("#")[0]).name for t in LINK.findall(readme) if t.startswith("docs/")}
    assert linked >= {p.name for p in PAGES[1:]}  # every page of docs/ is reachable from it


def test_the_recipe_key_reference_is_generated_from_the_schema():
    assert (REPO / "docs" / "recipe-keys.md").read_text() == defaults_markdown(), (
        "docs/recipe-keys.md is stale: accelvit defaults --markdown > docs/recipe-keys.md"
    )


def test_every_documented_command_is_accepted_by_its_subcommand():
    commands = accelvit_commands()
    assert {argv[0] for _, argv in commands} >= {"pretrain", "plan"}  # the extraction finds them
    subparsers = next(a for a in build_parser()._actions if a.dest == "command").choices
    for page, argv in commands:
        options = {o for a in subparsers[argv[0]]._actions for o in a.option_strings}
        used = {w.split("=")[0] for w in argv[1:] if w.startswith("--") or re.fullmatch(r"-\w", w)}
        assert used <= options, f"{page.name}: accelvit {' '.join(argv)}: {used - options}"


def test_documented_pretrain_commands_run_at_a_tiny_size(tmp_path, capsys):
    """Each documented `accelvit pretrain RECIPE` with a recipe of this repository, its model and
    data made tiny: the recipe as shipped must load and train."""
    shrink = [
        "model.image_size=16", "model.depth=1", "model.embed_dim=32", "model.num_heads=2",
        "data.dataset=synthetic", "data.limit=16", "data.workers=0", "train.budget=null",
        "train.steps=2", "train.batch_size=8", "eval.train_limit=null", "eval.test_limit=null",
    ]  # fmt: skip
    ran = 0
    for _, argv in accelvit_commands():
        recipe = REPO / argv[1] if argv[0] == "pretrain" and len(argv) > 1 else None
        if recipe is None or not recipe.is_file():
            continue
        out = tmp_path / f"run{ran}"
        sets = [w for s in shrink for w in ("--set", s)]
        assert main(["pretrain", str(recipe), "-o", str(out), *sets]) == 0
        assert (out / "checkpoints" / "step_2").is_dir()
        ran += 1
    assert ran >= 1  # the quickstart's


@pytest.fixture
def exported(tmp_path: Path) -> Path:
    """A tiny run's backbone exported as the README's snippets expect it: backbone.safetensors and,
    a plain ViT, the timm folder backbone/."""
    recipe = write_recipe(tmp_path / "tiny.yaml", {**TINY, "train": {**TINY["train"], "steps": 1}})
    assert main(["pretrain", str(recipe), "-o", str(tmp_path / "run")]) == 0
    assert main(["export", str(tmp_path / "run"), "-o", str(tmp_path / "backbone.safetensors")]) == 0
    assert main(["export", str(tmp_path / "run"), "-o", str(tmp_path / "backbone")]) == 0
    return tmp_path


def test_every_python_snippet_runs(exported):
    snippets = blocks("python")
    assert snippets, "no Python snippet found"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for page, _, body in snippets:
        done = subprocess.run([sys.executable, "-c", body], cwd=exported, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{page.name}:\n{body}\n{done.stderr[-2000:]}"
