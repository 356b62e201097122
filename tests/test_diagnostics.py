from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from accelvit.backbone import build_backbone
from accelvit.config import ModelConfig
from accelvit.diagnostics import attention_entropy, condition_numbers, measure_blocks

TINY = ModelConfig(
    arch="vit_tiny_patch16_224", image_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2
)


def test_entropy_of_uniform_and_one_hot_attention():
    n = 7
    assert attention_entropy(torch.full((2, 3, n, n), 1 / n)) == pytest.approx(1.0)
    assert attention_entropy(torch.eye(n).expand(2, 3, n, n)) == pytest.approx(0.0, abs=1e-12)
    # half the rows uniform over 2 of n tokens: entropy log 2 / log n on those rows
    probs = torch.zeros(1, 1, 2, n)
    probs[0, 0, 0, :2] = 0.5
    probs[0, 0, 1, 0] = 1.0
    assert attention_entropy(probs) == pytest.approx(0.5 * math.log(2) / math.log(n))


def test_condition_numbers_of_known_matrices():
    a = torch.zeros(2, 3, 4)
    a[0, 0, 0], a[0, 1, 1], a[0, 2, 2] = 3.0, 2.0, 0.5  # singular values 3, 2, 0.5
    a[1] = torch.eye(3, 4) * 2.0  # orthogonal rows: condition 1
    torch.testing.assert_close(condition_numbers(a), torch.tensor([6.0, 1.0], dtype=torch.float64))


def test_blocks_of_a_vit_with_zero_queries_and_keys_attend_uniformly():
    torch.manual_seed(0)
    vit = build_backbone(TINY)
    with torch.no_grad():
        for block in vit.blocks:
            block.attn.qkv.weight[: 2 * 32].zero_()  # q = k = bias: every score equal
            block.attn.qkv.bias[: 2 * 32].zero_()
    rows = measure_blocks(vit, torch.randn(4, 3, 16, 16))
    assert [r["block"] for r in rows] == [0, 1]
    for r in rows:
        assert r["entropy"] == pytest.approx(1.0, abs=1e-6)
        assert r["attn_cond"] >= 1.0 and r["block_cond"] >= 1.0
    assert vit.training  # the mode is restored
    assert not vit.norm_pre._forward_pre_hooks


def test_every_architecture_option_is_measured_per_block():
    torch.manual_seed(0)
    plain = build_backbone(TINY)
    x = torch.randn(4, 3, 16, 16)
    expected = measure_blocks(plain, x)
    for options in ({"value_residual": True, "value_lambdas": [1.0, 0.0]}, {"attn_skip": False}):
        other = build_backbone(dataclasses.replace(TINY, **options))
        other.load_state_dict(plain.state_dict(), strict=False)
        rows = measure_blocks(other, x)
        assert [sorted(r) for r in rows] == [sorted(r) for r in expected]
        if "value_residual" in options:  # the same model as the plain one: the same numbers
            for row, exp in zip(rows, expected, strict=True):
                assert row == pytest.approx(exp, rel=1e-5)
        else:
            assert rows[1]["entropy"] != pytest.approx(expected[1]["entropy"])


def test_pretraining_logs_diagnostics_and_resume_keeps_them_once(tmp_path, tiny_recipe):
    import json
    import shutil

    from accelvit.checkpoint import create_run_dir
    from accelvit.config import load_config
    from accelvit.train import pretrain

    cfg = load_config(tiny_recipe, ["train.diagnostics_every=2"])
    run_dir = tmp_path / "run"
    create_run_dir(run_dir, cfg)
    pretrain(cfg, run_dir)
    lines = (run_dir / "diagnostics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [0, 2, 4]
    assert all(len(r["blocks"]) == 2 and 0 < r["blocks"][0]["entropy"] <= 1 for r in records)
    shutil.rmtree(run_dir / "checkpoints/step_6")
    pretrain(cfg, run_dir, resume=True)  # from step 3: the step-4 line is taken again, once
    again = [json.loads(line) for line in (run_dir / "diagnostics.jsonl").read_text().splitlines()]
    assert again == records


def test_diagnose_command_prints_and_plots_runs(tmp_path, tiny_recipe, capsys):
    from accelvit.cli import main

    runs = []
    for name, keep in (("baseline", "1.0"), ("curriculum", "0.5")):
        run_dir = tmp_path / name
        assert main(["pretrain", str(tiny_recipe), "-o", str(run_dir), "--set", "train.diagnostics_every=3",
                     "--set", f"schedule.keep={keep}"]) == 0  # fmt: skip
        runs.append(str(run_dir))
    capsys.readouterr()
    out = tmp_path / "diag.png"
    assert main(["diagnose", *runs, "-o", str(out)]) == 0
    table = capsys.readouterr().out
    assert table.count("baseline") == 2 and table.count("curriculum") == 2  # a row per block
    assert out.stat().st_size > 1000
    assert main(["diagnose", str(tmp_path)]) == 2


def test_grad_error_reports_carry_the_diagnostics_of_the_measured_state(tmp_path, tiny_recipe):
    import json

    from accelvit.cli import main

    out = tmp_path / "report.json"
    assert (
        main(["grad-error", str(tiny_recipe), "--batches", "2", "--strategies", "0.5:4", "-o", str(out)]) == 0
    )
    report = json.loads(out.read_text())
    assert [b["block"] for b in report["diagnostics"]] == [0, 1]
    assert all(0 < b["entropy"] <= 1 and b["block_cond"] >= 1 for b in report["diagnostics"])
