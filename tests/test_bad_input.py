"""Bad input at the command line: one line naming what is wrong, exit code 2, nothing written.

Each case's message is also in the bad-input table of docs/reliability.md, so the table and the tests agree.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from accelvit.checkpoint import create_run_dir
from accelvit.cli import main
from accelvit.config import load_config
from accelvit.train import pretrain

REPO = Path(__file__).resolve().parents[1]


def _pretrain(tmp, recipe, *sets):
    return ["pretrain", str(recipe), "-o", str(tmp / "out"), *[a for s in sets for a in ("--set", s)]]


def _malformed(tmp, recipe):
    bad = tmp / "bad.yaml"
    bad.write_text("model:\n  arch: vit_tiny\n   depth: 3\n")
    return ["pretrain", str(bad), "-o", str(tmp / "out")]


def _empty_folder(tmp, recipe):
    (tmp / "empty/train").mkdir(parents=True)
    return _pretrain(tmp, recipe, "data.dataset=imagefolder", f"data.root={tmp / 'empty'}")


def _unreadable_images(tmp, recipe):
    (tmp / "images/cls").mkdir(parents=True)
    (tmp / "images/cls/a.png").write_text("not an image")
    return _pretrain(tmp, recipe, "data.dataset=imagefolder", f"data.root={tmp / 'images'}")


def _existing_run(tmp, recipe):
    create_run_dir(tmp / "run", load_config(recipe))
    return ["pretrain", str(recipe), "-o", str(tmp / "run")]


def _old_report(tmp, recipe):
    (tmp / "old.json").write_text(json.dumps({"schema": "accelvit.grad-error/0", "strategies": []}))
    return ["compare", str(tmp / "old.json")]


def _missing_checkpoint(tmp, recipe):
    cfg = load_config(recipe)
    create_run_dir(tmp / "run", cfg)
    pretrain(cfg, tmp / "run")
    return ["export", str(tmp / "run"), "--checkpoint", "step_99", "-o", str(tmp / "out.safetensors")]


def _overwrite_project(tmp, recipe):
    (tmp / "project").mkdir()
    (tmp / "project/notes.txt").write_text("not a run")
    return ["pretrain", str(recipe), "-o", str(tmp / "project"), "--overwrite"]


def _recipe_file(tmp, name: str, content: bytes | str) -> list[str]:
    path = tmp / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return ["pretrain", str(path), "-o", str(tmp / "out")]


ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
    for i in range(8)
)


def _report_file(tmp, content: str) -> list[str]:
    (tmp / "r.json").write_text(content)
    return ["compare", str(tmp / "r.json")]


def _trained_run(tmp, recipe):
    cfg = load_config(recipe)
    create_run_dir(tmp / "run", cfg)
    pretrain(cfg, tmp / "run")
    return tmp / "run"


def _export_to_folder(tmp, recipe):
    run = _trained_run(tmp, recipe)
    (tmp / "folder.safetensors").mkdir()
    return ["export", str(run), "-o", str(tmp / "folder.safetensors")]


def _export_into_a_used_folder(tmp, recipe):
    run = _trained_run(tmp, recipe)
    (tmp / "backbone").mkdir()
    (tmp / "backbone/notes.txt").write_text("not the export's")
    return ["export", str(run), "-o", str(tmp / "backbone")]


def _export_under_a_file(tmp, recipe):
    run = _trained_run(tmp, recipe)
    (tmp / "notes.txt").write_text("a file, not a folder")
    return ["export", str(run), "-o", str(tmp / "notes.txt/backbone.safetensors")]


def _run_under_a_file(tmp, recipe):
    (tmp / "notes.txt").write_text("a file, not a folder")
    return ["pretrain", str(recipe), "-o", str(tmp / "notes.txt/run")]


def _duplicate_key(tmp, recipe):
    (tmp / "twice.yaml").write_text(recipe.read_text() + "train: {steps: 3}\n")
    return ["pretrain", str(tmp / "twice.yaml"), "-o", str(tmp / "out")]


def _included_mapping_as_a_value(tmp, recipe):
    (tmp / "secret.yaml").write_text("password: hunter2\n")
    (tmp / "inc.yaml").write_text("model: {arch: !include secret.yaml}\n")
    return ["pretrain", str(tmp / "inc.yaml"), "-o", str(tmp / "out")]


def _export_to_a_device(tmp, recipe):
    return ["export", str(_trained_run(tmp, recipe)), "-o", "/dev/null"]


def _checkpoints_a_file(tmp, recipe):
    create_run_dir(tmp / "run", load_config(recipe))
    (tmp / "run/checkpoints").write_text("not a folder")
    return ["resume", str(tmp / "run")]


def _no_val_split(tmp, recipe):
    from PIL import Image

    (tmp / "images/train/cls").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (16, 16), (i * 60, 0, 0)).save(tmp / f"images/train/cls/{i}.png")
    return _pretrain(tmp, recipe, "data.dataset=imagefolder", f"data.root={tmp / 'images'}", "train.eval_every=2")


# (case, argv builder, message as in docs/reliability.md)
CASES = [
    ("malformed YAML", _malformed, "bad.yaml: line 3, column 9: malformed YAML"),
    (
        "unknown section",
        lambda t, r: _pretrain(t, r, "trian.steps=3"),
        "unknown key 'trian' (did you mean 'train'?)",
    ),
    (
        "misspelled key",
        lambda t, r: _pretrain(t, r, "train.stpes=3"),
        "unknown key 'train.stpes' (did you mean 'train.steps'?)",
    ),
    (
        "wrong type",
        lambda t, r: _pretrain(t, r, "train.steps=ten"),
        "train.steps = 'ten': expected an integer",
    ),
    ("out of range", lambda t, r: _pretrain(t, r, "optim.lr=-1"), "optim.lr = -1.0: must be positive"),
    (
        "keep outside (0, 1]",
        lambda t, r: _pretrain(t, r, "schedule.keep.end=1.5"),
        "schedule.keep.end = 1.5: keep ratio must be in (0, 1]",
    ),
    (
        "patch size that does not fit",
        lambda t, r: _pretrain(t, r, "schedule.patch=6"),
        "schedule.patch.start = 6.0: patch size must be one of [4, 8, 16]",
    ),
    (
        "arch that is not a timm ViT",
        lambda t, r: _pretrain(t, r, "model.arch=vit_tinny"),
        "model.arch = 'vit_tinny': not a timm ViT name",
    ),
    (
        "timm hybrid CNN-ViT arch",
        lambda t, r: _pretrain(t, r, "model.arch=vit_tiny_r_s16_p8_224"),
        "model.arch = 'vit_tiny_r_s16_p8_224': a hybrid CNN-ViT; use a plain ViT with model.stem",
    ),
    (
        "stem stride that the patch size does not fit",
        lambda t, r: _pretrain(t, r, "model.stem=[8, 8, 8]"),
        "model.patch_size = 4: must be a multiple of the stem's stride (8, model.stem: [8, 8, 8])",
    ),
    (
        "steps and budget both set",
        lambda t, r: _pretrain(t, r, "train.budget=1000"),
        "train.steps = 6: give exactly one of train.steps and train.budget",
    ),
    (
        "missing dataset folder",
        lambda t, r: _pretrain(t, r, "data.dataset=imagefolder", "data.root=/nonexistent/images"),
        "data.root = '/nonexistent/images': dataset folder does not exist",
    ),
    ("empty dataset folder", _empty_folder, "the dataset folder holds no files"),
    ("image folder without a readable image", _unreadable_images, "no image of the dataset can be read (first: "),
    ("run directory holding a run", _existing_run, "already holds a run: continue it with `accelvit resume"),
    ("report of another schema", _old_report, "report schema 'accelvit.grad-error/0', this accelvit reads"),
    ("checkpoint that does not exist", _missing_checkpoint, "does not exist or is incomplete"),
    ("resume of a folder that is no run", lambda t, r: ["resume", str(t)], "is not a run directory"),
    ("--overwrite of a folder that holds no run", _overwrite_project, "is not an accelvit run directory (no recipe.yaml)"),
    ("non-finite number", lambda t, r: _pretrain(t, r, "optim.lr=.inf"), "optim.lr = inf: expected a finite number"),
    ("seed out of range", lambda t, r: _pretrain(t, r, "train.seed=4294967296"), "train.seed = 4294967296: must be in [0, 2^32)"),
    ("recipe that includes itself", lambda t, r: _recipe_file(t, "self.yaml", "model: !include self.yaml\n"), "!include cycle (self.yaml -> self.yaml)"),
    ("include outside the recipe's folder", lambda t, r: _recipe_file(t, "abs.yaml", "model: !include /etc/hostname\n"), "must name a file inside"),
    ("YAML alias bomb", lambda t, r: _recipe_file(t, "bomb.yaml", ALIAS_BOMB), "YAML aliases expand to more than 100000 nodes"),
    ("recipe that is not UTF-8", lambda t, r: _recipe_file(t, "latin.yaml", b"model: {arch: caf\xe9}\n"), "not UTF-8 text (invalid continuation byte at byte 17)"),
    ("report that is not an object", lambda t, r: _report_file(t, "null"), "a grad-error report is a JSON object, got NoneType"),
    ("report with missing fields", lambda t, r: _report_file(t, '{"schema": "accelvit.grad-error/2", "strategies": []}'), "not a complete grad-error report"),
    ("output that is a folder", _export_to_folder, "folder.safetensors: exists and is not a regular file"),
    ("timm folder export into a folder in use", _export_into_a_used_folder, "backbone: exists and is not an empty folder"),
    ("output under a file", _export_under_a_file, "notes.txt is not a folder"),
    ("output that is a device", lambda t, r: ["plan", str(t / "r.json"), "-o", "/dev/null"], "-o /dev/null: exists and is not a regular file"),
    ("size that would hang", lambda t, r: _pretrain(t, r, "train.batch_size=1000000000"), "train.batch_size = 1000000000: must be at most 65536"),
    ("depth that would hang", lambda t, r: _pretrain(t, r, "model.depth=100000"), "model.depth = 100000: must be at most 1024"),
    ("value shown only in part", lambda t, r: _pretrain(t, r, "data.dataset=imagefolder", "data.root=/" + "d" * 200), "dddddd...: dataset folder does not exist"),
    ("run directory under a file", _run_under_a_file, "-o {tmp}/notes.txt/run: {tmp}/notes.txt is not a folder"),
    ("plot that cannot be written", lambda t, r: ["schedule", str(r), "--plot", "/proc/x.png"], "--plot /proc/x.png: not writable"),
    ("key given twice", _duplicate_key, "key 'train' given twice (first on line"),
    ("timing repeats that would hang", lambda t, r: _pretrain(t, r, "cost.repeats=1000000000"), "cost.repeats = 1000000000: must be at most 1000"),
    ("no table rows", lambda t, r: ["schedule", str(r), "--rows", "0"], "--rows 0: at least 2 (the first and the last step)"),
    ("negative table rows", lambda t, r: ["schedule", str(r), "--rows", "-3"], "--rows -3: at least 2"),
    ("no processes", lambda t, r: ["schedule", str(r), "--processes", "0"], "--processes 0: at least 1"),
    ("negative processes", lambda t, r: ["schedule", str(r), "--processes", "-2"], "--processes -2: at least 1"),
    ("included file where a value goes", _included_mapping_as_a_value, "model.arch = a mapping of 1 key: expected a string"),
    ("timm folder export to a device", _export_to_a_device, "-o /dev/null: exists and is not a folder (a name without .safetensors asks for a timm folder)"),
    ("resume with checkpoints/ a file", _checkpoints_a_file, "checkpoints' is not a folder of the run: move it away"),
    ("evaluation without a val/ split", _no_val_split, "evaluation needs a val/ folder beside train/"),
    ("step that cannot fit in memory", lambda t, r: _pretrain(t, r, "model.image_size=2048", "train.batch_size=512"), "a step keeps at least"),
    ("no command", lambda t, r: [], "the following arguments are required: command (see accelvit --help)"),
    ("unknown command", lambda t, r: ["frob"], "invalid choice: 'frob'"),
]


@pytest.mark.parametrize(("case", "argv", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, tiny_recipe, capsys, case, argv, message):
    args = argv(tmp_path, tiny_recipe)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("accelvit: error: "), err
    assert message.replace("{tmp}", str(tmp_path)) in err
    assert "hunter2" not in err  # an included file's content is never echoed
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written


def test_an_output_folder_that_refuses_writes_is_refused_before_any_work(tmp_path, capsys):
    # root passes os.access on anything; an immutable folder (chattr +i) refuses the write for real
    import subprocess

    locked = tmp_path / "locked"
    locked.mkdir()
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        assert main(["plan", str(tmp_path / "r.json"), "-o", str(locked / "plan.json")]) == 2
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)
    err = capsys.readouterr().err
    assert err == f"accelvit: error: -o {locked / 'plan.json'}: not writable\n"
    assert list(locked.iterdir()) == []


def test_the_readme_table_lists_every_case():
    page = (REPO / "docs" / "reliability.md").read_text()
    table = page[page.index("### Bad input") :]
    for case, _, message in CASES:
        row = re.search(rf"^\| {re.escape(case)} \|.*$", table, re.M)
        assert row, f"docs/reliability.md's bad-input table has no row for {case!r}"
        expected = re.sub(r"\\\|", "|", message.replace("`", "").replace("{tmp}", "TMP"))
        assert expected in row.group(0).replace("`", ""), case


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR", "--dynamo_backend (torch.compile of the whole model) is not supported"),
        ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4", "--gradient_accumulation_steps is not supported"),
        ("ACCELERATE_USE_FSDP", "true", "FSDP is not supported"),
        ("ACCELERATE_USE_DEEPSPEED", "true", "DeepSpeed is not supported"),
        ("ACCELERATE_MIXED_PRECISION", "fp16", "train.precision = 'bf16': the launcher asks fp16"),
    ],
)
def test_launcher_settings_the_loop_does_not_do_are_refused(
    tmp_path, tiny_recipe, capsys, monkeypatch, variable, value, message
):
    monkeypatch.setenv(variable, value)
    out = tmp_path / "out"
    assert main(["pretrain", str(tiny_recipe), "-o", str(out), "--set", "train.precision=bf16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("accelvit: error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_a_recipe_without_precision_takes_the_launchers(tiny_recipe, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert load_config(tiny_recipe).train.precision == "bf16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # accelerate launch's default asks nothing
    assert load_config(tiny_recipe, ["train.precision=bf16"]).train.precision == "bf16"
    assert load_config(tiny_recipe).train.precision == "no"
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert load_config(tiny_recipe).train.precision == "no"


def test_a_plot_named_without_a_suffix_says_the_file_it_wrote(tmp_path, tiny_recipe, capsys):
    (tmp_path / "plots").mkdir()
    assert main(["schedule", str(tiny_recipe), "--plot", str(tmp_path / "plots")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"plot: {tmp_path / 'plots.png'}"
    assert (tmp_path / "plots.png").is_file() and list((tmp_path / "plots").iterdir()) == []
