"""train.compile: the backbone forward compiled once per compression setting, the schedule's
settings bucketed so that their number is bounded."""

from __future__ import annotations

import json

import pytest
import torch

from accelvit import compress
from accelvit.budget import simulate
from accelvit.build import flops_cost, recipe_shape
from accelvit.checkpoint import create_run_dir
from accelvit.config import load_config
from accelvit.train import pretrain


def _records(cfg, run_dir):
    create_run_dir(run_dir, cfg)
    pretrain(cfg, run_dir)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def counted_compiles(monkeypatch):
    """Compiles with aot_eager (the graphs inductor would get, without a C++ build), counted."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(compress, "COMPILE_BACKEND", "aot_eager")
    compress._compiled.cache_clear()
    torch._dynamo.reset()
    counters.clear()
    yield counters
    compress._compiled.cache_clear()
    torch._dynamo.reset()


def test_a_compiled_run_trains_as_the_eager_one_with_one_graph_per_setting(
    tmp_path, tiny_recipe, counted_compiles
):
    compiled = load_config(tiny_recipe, ["train.compile=default"])
    assert compiled.schedule.keep_buckets == 16  # set for it, and written into the run's recipe
    eager = load_config(tiny_recipe, ["schedule.keep_buckets=16"])
    want = _records(eager, tmp_path / "eager")
    assert counted_compiles["stats"]["unique_graphs"] == 0
    got = _records(compiled, tmp_path / "compiled")
    settings = {(r["keep"], r["patch"]) for r in got}
    assert [r["keep"] for r in got] == [r["keep"] for r in want]
    assert all(k * 16 == round(k * 16) for k, _ in settings)  # multiples of 1/16
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-4)
    assert counted_compiles["stats"]["unique_graphs"] == len(settings)


def test_bucketed_keep_ratios_are_few_and_never_below_the_schedule(tiny_recipe):
    ramp = ["train.steps=2000", "schedule.keep={shape: linear, start: 0.25, end: 1.0}", "schedule.patch=4"]
    exact = load_config(tiny_recipe, ramp)
    bucketed = load_config(tiny_recipe, [*ramp, "schedule.keep_buckets=16"])
    shape = recipe_shape(exact)
    rows = [simulate(c, shape, flops_cost(c, shape), 8) for c in (exact, bucketed)]
    exact_keeps, bucketed_keeps = ([r.setting.keep for r in rs] for rs in rows)
    assert len(set(exact_keeps)) > 1000 and len(set(bucketed_keeps)) == 13  # 4/16 .. 16/16
    assert all(b >= e - 1e-12 and b - e < 1 / 16 for b, e in zip(bucketed_keeps, exact_keeps, strict=True))


def test_a_patch_scaled_graph_resamples_the_kernel_without_recomputing_its_pseudo_inverse(monkeypatch):
    """The pseudo-inverse depends on the sizes alone: computed once, eagerly, not in every step's graph."""
    from accelvit.backbone import build_backbone
    from accelvit.config import ModelConfig
    from accelvit.setting import Setting

    ops: list[str] = []

    def recording(gm, example_inputs):
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    monkeypatch.setattr(compress, "COMPILE_BACKEND", recording)
    compress._compiled.cache_clear()
    monkeypatch.setattr(compress, "_RESAMPLERS", {})
    torch._dynamo.reset()
    vit = build_backbone(ModelConfig(image_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2))
    images = torch.randn(2, 3, 16, 16)
    want = compress.forward_features(vit, images, Setting(1.0, 8))
    with compress.compiled_features("default"):
        got = compress.forward_features(vit, images, Setting(1.0, 8))
    compress._compiled.cache_clear()
    torch._dynamo.reset()
    assert any("conv2d" in op for op in ops)  # the graph was recorded
    assert not [op for op in ops if "pinv" in op or "svd" in op or "lstsq" in op]
    torch.testing.assert_close(got, want)
