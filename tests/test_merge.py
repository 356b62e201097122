"""Token merging (ToMe): exact cases, token counts, gradients, cost model, estimator and plan."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch

from accelvit.arch import attention
from accelvit.backbone import build_backbone, vit_shape
from accelvit.budget import VitShape, forward_flops, table_cost_fn
from accelvit.compress import forward_features, forward_tokens
from accelvit.config import ModelConfig, load_config
from accelvit.merge import bipartite_soft_matching, merge_weighted, merged_per_block, patch_tokens_per_block
from accelvit.plan import choose, schedule_from_plan
from accelvit.schedule import setting_at
from accelvit.setting import Setting, parse_strategies
from accelvit.timing import measured_settings

TINY = ModelConfig(
    arch="vit_tiny_patch16_224", image_size=16, patch_size=2, embed_dim=32, depth=3, num_heads=2
)


def tiny(**options):
    torch.manual_seed(0)
    return build_backbone(dataclasses.replace(TINY, **options)).eval()


def test_merge_zero_is_the_plain_forward_and_accelvits_blocks_equal_timms():
    vit, x = tiny(), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(forward_tokens(vit, x, Setting(1.0, 2, 0.0)), vit.forward_features(x))
        # a merge fraction that rounds to no merge in every block takes accelvit's block forward
        assert merged_per_block(64, 0.007) == 0
        torch.testing.assert_close(forward_tokens(vit, x, Setting(1.0, 2, 0.007)), vit.forward_features(x))


def test_matching_merges_the_most_similar_pair_by_size_weighted_average():
    # prefix + 4 patches: A = (p0, p2), B = (p1, p3); p0 and p3 point the same way, p2 matches nothing
    metric = torch.tensor([[[9.0, 9, 9], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0.01, 0]]])
    x = torch.arange(5.0).view(1, 5, 1) * 10
    merge = bipartite_soft_matching(metric, r=1, num_prefix=1)
    (out,), size = merge_weighted(merge, [x], torch.ones(1, 5))
    # prefix, unmerged A (p2), then B (p1, p3 with p0 merged into it)
    assert out.flatten().tolist() == [0.0, 30.0, 20.0, (10.0 + 40.0) / 2]
    assert size.flatten().tolist() == [1.0, 1.0, 1.0, 2.0]
    # sizes weigh the average: a token standing for 3 patches outweighs one standing for 1
    (out,), size = merge_weighted(merge, [x], torch.tensor([[1.0, 3, 1, 1, 1]]))
    assert out[0, -1, 0].item() == pytest.approx((3 * 10 + 40) / 4)
    assert size[0, -1].item() == 4.0


def test_prefix_tokens_are_never_merged():
    metric = torch.ones(2, 9, 4)  # every token identical: any pair could merge
    x = torch.randn(2, 9, 4)
    merge = bipartite_soft_matching(metric, r=3, num_prefix=2)
    (out,), _ = merge_weighted(merge, [x], torch.ones(2, 9))
    assert out.shape == (2, 6, 4)
    assert torch.equal(out[:, :2], x[:, :2])


def test_proportional_attention_treats_a_merged_token_as_its_copies():
    attn = tiny().blocks[0].attn
    h = torch.randn(1, 3, 32)
    duplicated = torch.cat([h, h[:, 2:]], dim=1)  # the last token twice, each of size 1
    with torch.no_grad():
        full, *_ = attention(attn, duplicated, None, None, None)
        merged, *_ = attention(attn, h, None, None, torch.tensor([[1.0, 1.0, 2.0]]))
    torch.testing.assert_close(merged, full[:, :3])


@pytest.mark.parametrize(("keep", "patch", "merge"), [(1.0, 2, 0.1), (1.0, 2, 0.5), (0.5, 4, 0.25)])
def test_token_counts_per_block_follow_the_formula(keep, patch, merge):
    vit = tiny()
    seen = []
    out = forward_tokens(
        vit, torch.randn(2, 3, 16, 16), Setting(keep, patch, merge), lambda i, t: seen.append(t["q"])
    )
    patches = max(1, round(keep * (16 // patch) ** 2))
    counts = patch_tokens_per_block(patches, merge, depth=3)
    assert [q.shape[2] for q in seen] == [1 + n for n in counts[:-1]]
    assert out.shape == (2, 1 + counts[-1], 32)
    # the formula: each block removes min(round(m * n), n // 2)
    for before, after in itertools.pairwise(counts):
        assert before - after == min(round(merge * before), before // 2)


def test_gradients_reach_every_patch_through_merged_tokens_unlike_dropout():
    vit = tiny()
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    forward_features(vit, x, Setting(1.0, 2, 0.5)).square().sum().backward()
    per_patch = x.grad.abs().unfold(2, 2, 2).unfold(3, 2, 2).sum(dim=(1, 4, 5))  # (B, 8, 8)
    assert (per_patch > 0).all()  # every patch contributes to some merged token
    assert vit.patch_embed.proj.weight.grad.abs().sum() > 0
    x.grad = None
    torch.manual_seed(0)
    forward_features(vit, x, Setting(0.25, 2)).square().sum().backward()
    per_patch = x.grad.abs().unfold(2, 2, 2).unfold(3, 2, 2).sum(dim=(1, 4, 5))
    assert (per_patch == 0).sum() == 2 * 48  # dropout: 48 of 64 patches per image get no gradient


def test_value_residual_merges_the_first_blocks_values_with_the_tokens():
    x = torch.randn(2, 3, 16, 16)
    plain = tiny()
    fixed = tiny(value_residual=True, value_lambdas=[1.0, 0.0])
    fixed.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        merged = Setting(1.0, 2, 0.3)
        assert torch.equal(forward_tokens(fixed, x, merged), forward_tokens(plain, x, merged))
    learnable = tiny(value_residual=True)
    forward_tokens(
        learnable, x, Setting(1.0, 2, 0.3)
    ).square().mean().backward()  # V_1 lines up block by block
    assert learnable.value_lambdas.grad[1:].abs().sum() > 0


def test_cost_model_counts_the_shrinking_sequence_block_by_block():
    shape = VitShape(image_size=8, embed_dim=4, depth=2, mlp_ratio=4, in_chans=1, num_heads=2)
    # 16 patches of 2x2 -> merge 0.25 removes 4 then 3: attention on 17 then 13, MLP on 13 then 10
    assert patch_tokens_per_block(16, 0.25, 2) == [16, 12, 9]
    embed = 2 * 16 * 1 * 4 * 4
    d = 4

    def block(n, m, a, b):
        return 8 * n * d * d + 4 * n * n * d + 16 * m * d * d + n * d + 2 * a * b * d / 2

    expected = embed + block(17, 13, 8, 8) + block(13, 10, 6, 6)
    assert forward_flops(shape, Setting(1.0, 2, 0.25)) == pytest.approx(expected)
    unmerged = embed + 2 * (8 * 17 * d * d + 4 * 17 * 17 * d + 16 * 17 * d * d)  # no matching cost either
    assert forward_flops(shape, Setting(1.0, 2, 0.0)) == pytest.approx(unmerged)
    assert forward_flops(shape, Setting(1.0, 2, 0.25)) < forward_flops(shape, Setting(1.0, 2))
    assert vit_shape(tiny(), 16).num_heads == 2


def test_measured_costs_interpolate_in_keep_then_merge():
    table = [
        {"keep": 0.5, "patch": 4, "merge": 0.0, "units": 2.0},
        {"keep": 1.0, "patch": 4, "merge": 0.0, "units": 4.0},
        {"keep": 0.5, "patch": 4, "merge": 0.2, "units": 1.0},
        {"keep": 1.0, "patch": 4, "merge": 0.2, "units": 2.0},
        {"keep": 1.0, "patch": 8, "units": 1.0},  # tables written before merging: merge 0
    ]
    cost = table_cost_fn(table)
    assert cost(Setting(0.75, 4, 0.2)) == pytest.approx(1.5)
    assert cost(Setting(0.75, 4, 0.1)) == pytest.approx((3.0 + 1.5) / 2)
    assert cost(Setting(1.0, 8)) == 1.0
    with pytest.raises(ValueError, match="merge 0.3 at patch 4 was not measured"):
        cost(Setting(1.0, 4, 0.3))


def test_schedule_ramps_merge_and_strategies_take_a_merge_field(tiny_config):
    cfg = tiny_config
    cfg.schedule.merge = dataclasses.replace(cfg.schedule.merge, shape="linear", start=0.3, end=0.0)
    assert setting_at(cfg.schedule, 0.0, 16, 4).merge == pytest.approx(0.3)
    assert setting_at(cfg.schedule, 1.0, 16, 4).merge == 0.0
    assert {s.merge for s in measured_settings(cfg)} == {0.0, 0.1, 0.2, 0.3}
    assert parse_strategies("0.5:4,1:4:0.25") == [Setting(0.5, 4), Setting(1.0, 4, 0.25)]
    assert Setting(1.0, 4, 0.25).label == "1:4:0.25" and Setting(0.5, 8).label == "0.5:8"
    with pytest.raises(ValueError, match="keep:patch\\[:merge\\]"):
        parse_strategies("1:4:0.2:9")


def test_plan_writes_a_merge_ramp_when_a_stage_merges():
    table = {Setting(1.0, 4): 3.0, Setting(0.5, 4): 2.0, Setting(1.0, 4, 0.25): 1.0}
    choice = choose(table)
    assert choice.setting == Setting(1.0, 4, 0.25) and choice.runner_up == Setting(0.5, 4)
    assert choice.to_dict()["merge"] == 0.25 and choice.to_dict()["runner_up"]["merge"] == 0.0
    schedule = schedule_from_plan([(0.0, choice), (0.5, choose({Setting(1.0, 4): 1.0}))])
    assert schedule["merge"] == {"shape": "step", "points": [[0.0, 0.25], [0.5, 0.0]]}
    assert "merge" not in schedule_from_plan([(0.0, choose({Setting(0.5, 4): 1.0}))])


def test_grad_error_report_compares_merge_with_dropout_at_one_cost(tmp_path, tiny_recipe):
    from accelvit.cli import main

    out = tmp_path / "r.json"
    strategies = "0.5:4,1:4:0.5"
    assert (
        main(["grad-error", str(tiny_recipe), "--batches", "2", "--strategies", strategies, "-o", str(out)])
        == 0
    )
    rows = json.loads(out.read_text())["strategies"]
    assert [(r["keep"], r["patch"], r["merge"]) for r in rows] == [(0.5, 4, 0.0), (1.0, 4, 0.5)]
    assert all(0 < r["flops"] < 1 and r["bias_sq"] == r["bias_sq"] for r in rows)
    assert "| 1:4:0.5 |" in out.with_suffix(".md").read_text()


def test_pretraining_with_a_merge_ramp_logs_it_and_spends_less_per_step(tmp_path, tiny_recipe):
    from accelvit.cli import main

    runs = {}
    for merge in ("0.0", "0.4"):
        run_dir = tmp_path / f"merge{merge}"
        assert (
            main(["pretrain", str(tiny_recipe), "-o", str(run_dir), "--set", f"schedule.merge={merge}"]) == 0
        )
        runs[merge] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert load_config(run_dir / "recipe.yaml").schedule.merge.start == float(merge)
    assert {r["merge"] for r in runs["0.4"]} == {0.4}
    assert all(r["loss"] == r["loss"] for r in runs["0.4"])
    assert runs["0.4"][-1]["budget_spent"] < runs["0.0"][-1]["budget_spent"]
