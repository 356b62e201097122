from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from accelvit.cli import main
from accelvit.config import Config, ConfigError, changed_keys, describe_defaults, dump_config, load_config
from tests.conftest import TINY, write_recipe

REPO = Path(__file__).resolve().parents[1]


def recipe_with(tmp_path: Path, **changes: object) -> Path:
    data = copy.deepcopy(TINY)
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        data[section][key] = value
    return write_recipe(tmp_path / "r.yaml", data)


def test_defaults_are_valid_and_documented():
    cfg = load_config(None, ["data.dataset=synthetic"])
    assert cfg.train.steps == Config().train.steps
    text = describe_defaults()
    for key in ("arch:", "image_size:", "dropout_views:", "warmup:", "keep_checkpoints:", "precision:"):
        assert key in text
    described = yaml.safe_load(text)
    assert described["train"]["batch_size"] == Config().train.batch_size
    # nested sections show their own defaults, not those of a bare RampConfig
    assert described["schedule"]["keep"]["start"] == 1.0 and described["schedule"]["merge"]["start"] == 0.0


def test_every_shipped_recipe_loads():
    for recipe in sorted((REPO / "recipes").glob("*.yaml")):
        load_config(recipe, check_paths=False)


def test_resolved_recipe_round_trips(tmp_path, tiny_config):
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(tiny_config))
    assert load_config(path) == tiny_config


def test_changed_keys_are_the_values_a_recipe_sets_apart_from_the_defaults(tiny_config):
    assert changed_keys(Config()) == {}
    changed = changed_keys(tiny_config)
    assert changed["model"]["image_size"] == tiny_config.model.image_size
    # a key left at its default (as one added by a later version) does not appear; a value set does
    at_default = replace(tiny_config, objective=replace(tiny_config.objective, head_batch_norm=False))
    assert changed_keys(at_default) == changed
    set_ = changed_keys(replace(tiny_config, objective=replace(tiny_config.objective, head_batch_norm=True)))
    assert set_["objective"]["head_batch_norm"] is True


def test_scalar_ramp_means_constant(tmp_path):
    cfg = load_config(recipe_with(tmp_path), ["schedule.keep=0.5"])
    assert cfg.schedule.keep.shape == "constant" and cfg.schedule.keep.start == 0.5


def test_set_overrides_parse_yaml(tiny_recipe):
    cfg = load_config(tiny_recipe, ["train.steps=12", "schedule.keep.end=0.75", "optim.clip_grad=1"])
    assert cfg.train.steps == 12
    assert cfg.schedule.keep.end == 0.75
    assert cfg.optim.clip_grad == 1.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trian.steps=3"], "unknown key 'trian' (did you mean 'train'?)"),
        (["train.stpes=3"], "unknown key 'train.stpes' (did you mean 'train.steps'?)"),
        (["train.steps=ten"], "train.steps = 'ten': expected an integer"),
        (["train.steps=-5"], "train.steps = -5: must be a positive number of steps"),
        (["schedule.keep.start=1.5"], "schedule.keep.start = 1.5: keep ratio must be in (0, 1]"),
        (["schedule.keep.end=0"], "schedule.keep.end = 0.0: keep ratio must be in (0, 1]"),
        (["model.patch_size=5"], "model.patch_size = 5: must divide model.image_size (16)"),
        (
            ["schedule.patch.points=[[0, 6]]"],
            "schedule.patch.points[0] = [0.0, 6.0]: patch size must be one of [4, 8, 16]",
        ),
        (
            ["data.dataset=fashion-mnist", "data.root=/nonexistent/fmnist"],
            "data.root = '/nonexistent/fmnist': dataset folder does not exist",
        ),
        (["train.precision=fp8"], "train.precision = 'fp8'"),
        (["objective.name=byol"], "objective.name = 'byol': expected one of ['dino', 'mocov3', 'simclr']"),
        (["schedule.dropout_views=key"], "schedule.dropout_views = 'key'"),
        (["schedule.merge=0.7"], "schedule.merge.start = 0.7: merge fraction must be in [0, 0.5]"),
        (
            ["schedule.patch={shape: random, choices: [4, 6]}"],
            "schedule.patch.choices[1] = 6.0: patch size must be one of [4, 8, 16]",
        ),
        (["schedule.patch={shape: random}"], "schedule.patch.choices = None: a random schedule needs"),
        (
            ["schedule.patch={shape: random, choices: [4, 8], weights: [1]}"],
            "schedule.patch.weights = [1.0]: one non-negative weight per choice",
        ),
        (["schedule.keep.choices=[0.5]"], "schedule.keep.choices = [0.5]: only for shape random"),
        (["optim.weight_decay_end=-1"], "optim.weight_decay_end = -1.0: must be >= 0 or null"),
        (["objective.freeze_last_layer=1.5"], "objective.freeze_last_layer = 1.5: must be in [0, 1)"),
        (["eval.encoder=momentum"], "eval.encoder = 'momentum': expected one of ['student', 'teacher']"),
        (["eval.encoder=teacher"], "eval.encoder = 'teacher': objective simclr has no teacher"),
        (["model.pos_embed=rope"], "model.pos_embed = 'rope': expected one of ['learn', 'sincos']"),
        (["train.grad_error_at=[0.5, 1.0]"], "train.grad_error_at[1] = 1.0: must be a progress in [0, 1)"),
        (
            ["train.grad_error_strategies=0.5:5"],
            "train.grad_error_strategies = '0.5:5': expected keep:patch[:merge], keep in (0, 1], "
            "patch one of [4, 8, 16]",
        ),
        (
            ["objective.local_crop_size=6"],
            "objective.local_crop_size = 6: must be a multiple of model.patch_size (4)",
        ),
        (["objective.momentum=1.0"], "objective.momentum = 1.0: must be in [0, 1)"),
        (
            ["objective.name=dino", "data.views=byol"],
            "data.views = 'byol': dino draws its own multi-crop views",
        ),
        (["train.budget=1000"], "train.steps = 6: give exactly one of train.steps and train.budget"),
        (["train.steps=null"], "train.steps = None: give exactly one of train.steps and train.budget"),
        (["train.steps=null", "train.budget=-1"], "train.budget = -1.0: must be positive"),
        (["cost.model=wallclock"], "cost.model = 'wallclock': expected one of ['flops', 'measured']"),
        (["optim.decay=step"], "optim.decay = 'step': expected one of ['cosine', 'poly']"),
        (["schedule.mode=auto"], "schedule.mode = 'auto': expected one of ['fixed', 'adaptive']"),
        (["schedule.stages=[0.5, 0.25]"], "schedule.stages[1] = 0.25: must increase in [0, 1)"),
        (["schedule.candidates=0.5:3"], "schedule.candidates = '0.5:3': expected keep:patch[:merge]"),
        (["schedule.file=/nonexistent/plan.yaml"], "schedule.file file not found: /nonexistent/plan.yaml"),
    ],
)
def test_bad_values_name_key_and_value(tiny_recipe, overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(tiny_recipe, overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_key_in_file_suggests(tmp_path):
    data = copy.deepcopy(TINY)
    data["train"]["batchsize"] = 4
    with pytest.raises(
        ConfigError, match=r"unknown key 'train.batchsize' \(did you mean 'train.batch_size'\?\)"
    ):
        load_config(write_recipe(tmp_path / "r.yaml", data))


def test_malformed_yaml_names_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  steps: 3\n  batch_size: [4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+, column \d+: malformed YAML"):
        load_config(path)


def test_cli_error_exits_2_and_writes_nothing(tmp_path, tiny_recipe, capsys):
    run_dir = tmp_path / "run"
    code = main(["pretrain", str(tiny_recipe), "-o", str(run_dir), "--set", "schedule.keep.start=2"])
    assert code == 2
    assert not run_dir.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["accelvit: error: schedule.keep.start = 2.0: keep ratio must be in (0, 1]"]


def test_budget_replaces_the_default_steps(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", {"train": {"budget": 5000}})
    cfg = load_config(recipe)
    assert (cfg.train.steps, cfg.train.budget) == (None, 5000.0)


def test_schedule_from_an_included_file_or_schedule_file(tmp_path, tiny_recipe):
    plan = tmp_path / "plan.yaml"
    plan.write_text("keep: {shape: step, points: [[0.0, 0.25], [0.5, 1.0]]}\npatch: 8\n")
    included = tmp_path / "with_include.yaml"
    recipe = yaml.safe_load(tiny_recipe.read_text())
    recipe["schedule"] = "PLACEHOLDER"
    text = yaml.safe_dump(recipe).replace("PLACEHOLDER", "!include plan.yaml")
    included.write_text(text)
    by_include = load_config(included).schedule
    by_file = load_config(tiny_recipe, [f"schedule.file={plan}"]).schedule
    assert by_include.keep.points == [[0.0, 0.25], [0.5, 1.0]]
    assert by_include.patch.start == 8
    assert by_file == by_include  # the file is merged and then no longer needed
    assert by_file.file is None
