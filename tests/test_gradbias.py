from __future__ import annotations

import pytest
import torch
from torch import nn

from accelvit.backbone import build_backbone
from accelvit.compress import drop_tokens, embed_tokens
from accelvit.config import ModelConfig, ObjectiveConfig
from accelvit.gradbias import measure, parameter_groups, summarize
from accelvit.objectives import OBJECTIVES
from accelvit.setting import Setting

MODEL = ModelConfig(image_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)


def simclr(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = ObjectiveConfig(hidden_dim=32, out_dim=16)
    return OBJECTIVES["simclr"].build(cfg, build_backbone(MODEL), "query")


def batches(k: int, size: int = 8) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [[torch.randn(size, 3, 16, 16, generator=gen) for _ in range(2)] for _ in range(k)]


def test_groups_cover_every_trainable_parameter_once():
    model = simclr()
    params, groups = parameter_groups(model)
    names = [g.name for g in groups]
    assert names == ["patch_embed", "block_00", "block_01", "backbone_norm", "head"]
    assert groups[-1].stop == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert all(a.stop == b.start for a, b in zip(groups, groups[1:], strict=False))
    assert len({id(p) for p in params}) == len(params)


def test_full_setting_has_zero_bias_and_cosine_one():
    model = simclr()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    raw = measure(model, batches(3), [Setting(1.0, 4)], base_patch=4)
    (row,) = summarize(raw)
    assert row["bias_sq_plain"] == 0.0 and row["relative_bias"] == 0.0
    assert row["bias_sq"] == pytest.approx(0.0, abs=1e-12)
    assert row["cosine"] == pytest.approx(1.0) and row["cosine_batch"] == pytest.approx(1.0)
    assert row["variance"] == pytest.approx(row["variance_full"])
    assert set(row["groups"]) == {"patch_embed", "block_00", "block_01", "backbone_norm", "head"}
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was changed
    assert all(p.grad is None for p in model.parameters())


class TokenMean(nn.Module):
    """Linear model of the mean patch token: the dropout gradient is unbiased in closed form.

    loss = w . mean_i(x_i) over kept tokens, so d loss / d w = mean of the kept tokens, an unbiased
    estimate of the mean over all tokens (sampling without replacement).
    """

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.backbone = vit
        self.w = nn.Parameter(torch.ones(vit.embed_dim))

    def forward(self, views, setting, progress):
        with torch.no_grad():
            tokens = embed_tokens(self.backbone, views[0], setting.patch)
        kept = drop_tokens(tokens, setting.keep, num_prefix=1)[:, 1:]
        return (kept.mean(dim=1) @ self.w).mean()


def test_dropout_on_a_token_mean_model_is_unbiased_with_the_theoretical_variance():
    torch.manual_seed(0)
    vit = build_backbone(MODEL)
    for p in vit.parameters():
        p.requires_grad_(False)
    model = TokenMean(vit)
    # one image per batch, the same image every time: the only randomness is the token subset
    image = torch.randn(1, 3, 16, 16)
    k = 400
    raw = measure(model, [[image, image]] * k, [Setting(0.25, 4)], base_patch=4)
    (row,) = summarize(raw)
    tokens = embed_tokens(vit, image, 4)[0, 1:]  # (N, D), N = 16
    n, m = tokens.shape[0], 4
    # variance of the mean of m of n items drawn without replacement, summed over dimensions
    per_dim = tokens.var(dim=0, unbiased=True) / m * (n - m) / n
    assert row["variance"] == pytest.approx(per_dim.sum().item(), rel=0.15)
    assert row["variance_full"] == pytest.approx(0.0, abs=1e-10)
    assert abs(row["bias_sq"]) < 0.05 * row["variance"]
    assert row["bias_sq_plain"] == pytest.approx(row["variance"] / k, rel=0.5)  # noise only


def test_patch_scaling_of_a_trained_model_is_biased():
    model = simclr()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for views in batches(15, size=16):  # a little training moves the kernel off its init
        loss = model(views, Setting(1.0, 4), 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # The same batch K times: without dropout both gradients are deterministic, so the whole
    # difference is bias and the finite-sample correction vanishes.
    views = batches(1)[0]
    raw = measure(model, [views] * 3, [Setting(1.0, 8), Setting(1.0, 4)], base_patch=4)
    scaled, full = summarize(raw)
    assert scaled["variance"] == pytest.approx(0.0, abs=1e-9)
    assert scaled["bias_sq"] == pytest.approx(scaled["bias_sq_plain"]) and scaled["bias_sq"] > 0
    assert scaled["relative_bias"] > 0.05
    assert scaled["cosine"] < 0.999 and full["cosine"] == pytest.approx(1.0)
    assert full["bias_sq"] == pytest.approx(0.0, abs=1e-12)
    assert scaled["ca_mse"] == pytest.approx(scaled["bias_sq"] + scaled["cost"] * scaled["variance"])


def run_cli(*args: str, env: dict | None = None, processes: int = 1) -> None:
    import os
    import subprocess
    import sys

    launcher = [sys.executable, "-m", "accelvit.cli"]
    if processes > 1:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
            "--master_port",
            "29517",
            "-m",
            "accelvit.cli",
        ]
    result = subprocess.run(
        [*launcher, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "ACCELERATE_USE_CPU": "1", **(env or {})},
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_processes_give_the_one_process_report(tmp_path, tiny_recipe):
    import json

    common = ["grad-error", str(tiny_recipe), "--batches", "4", "--strategies", "1.0:8,0.5:4,0.25:8"]
    run_cli(*common, "-o", str(tmp_path / "one.json"))
    run_cli(*common, "-o", str(tmp_path / "two.json"), processes=2)
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (one["processes"], two["processes"], one["batches"], two["batches"]) == (1, 2, 4, 4)
    for a, b in zip(one["strategies"], two["strategies"], strict=True):
        for key in (
            "bias_sq",
            "bias_sq_plain",
            "relative_bias",
            "variance",
            "variance_full",
            "cosine",
            "cosine_batch",
        ):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
        for group in one["groups"]:
            assert a["groups"][group]["bias_sq"] == pytest.approx(
                b["groups"][group]["bias_sq"], rel=1e-3, abs=1e-4
            )


def test_grad_error_writes_report_table_and_plot_and_compare_reads_them(tmp_path, tiny_recipe, capsys):
    import json

    from accelvit.cli import main

    out = tmp_path / "r.json"
    assert main(["grad-error", str(tiny_recipe), "--batches", "2", "-o", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["schema"] == "accelvit.grad-error/2"
    assert [(r["keep"], r["patch"]) for r in report["strategies"]] == [
        (0.5, 4),
        (0.25, 4),
        (1.0, 8),
        (0.5, 8),
        (0.25, 8),
    ]
    assert {
        "model",
        "objective",
        "dataset",
        "step",
        "progress",
        "batches",
        "batch_size",
        "processes",
        "groups",
        "wall_s",
    } <= set(report)
    assert "(best)" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 0
    capsys.readouterr()

    assert (
        main(["compare", str(out), str(out), "-o", str(tmp_path / "c.md"), "--plot", str(tmp_path / "c.png")])
        == 0
    )
    table = (tmp_path / "c.md").read_text()
    assert "### ca_mse" in table and "| 0.25:8 |" in table
    assert (tmp_path / "c.png").exists()

    other = tmp_path / "old.json"
    other.write_text(json.dumps({**report, "schema": "accelvit.grad-error/0"}))
    assert main(["compare", str(out), str(other)]) == 2
    assert "report schema 'accelvit.grad-error/0'" in capsys.readouterr().err


def test_grad_error_on_a_run_checkpoint(tmp_path, tiny_recipe):
    import json

    from accelvit.cli import main

    run_dir = tmp_path / "run"
    assert main(["pretrain", str(tiny_recipe), "-o", str(run_dir)]) == 0
    out = tmp_path / "r.json"
    assert (
        main(
            [
                "grad-error",
                str(run_dir),
                "--checkpoint",
                "step_3",
                "--batches",
                "2",
                "--strategies",
                "0.5:4",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert report["step"] == 3 and report["progress"] == 0.5
    assert main(["grad-error", str(run_dir), "--strategies", "0.5:5", "-o", str(out)]) == 2


def test_grad_error_during_pretraining_keeps_the_run_bit_exact(tmp_path, tiny_recipe):
    import json

    from accelvit.checkpoint import create_run_dir
    from accelvit.config import load_config
    from accelvit.train import pretrain

    def losses(run_dir):
        return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    plain = load_config(tiny_recipe)
    probed = load_config(
        tiny_recipe,
        [
            "train.grad_error_at=[0.0, 0.5]",
            "train.grad_error_batches=2",
            "train.grad_error_strategies=0.5:4,1.0:8",
        ],
    )
    for name, cfg in (("plain", plain), ("probed", probed)):
        create_run_dir(tmp_path / name, cfg)
        pretrain(cfg, tmp_path / name)
    assert losses(tmp_path / "plain") == losses(tmp_path / "probed")  # the estimator changes nothing
    reports = sorted(p.name for p in (tmp_path / "probed/grad_error").glob("*.json"))
    assert reports == ["step_0.json", "step_3.json"]
    report = json.loads((tmp_path / "probed/grad_error/step_3.json").read_text())
    assert report["progress"] == 0.5 and len(report["strategies"]) == 2


def synthetic(k: int, bias: float, noise: float, seed: int, extra: float = 0.5, size: int = 400) -> dict:
    """`measure`'s output for made-up gradients: g_k = mu + noise, ĝ_k = g_k + b + more noise, with
    ||mu|| = 1, ||b|| = `bias`, tr Cov(g) = `noise`^2 and tr Cov(ĝ - g) = (`extra` * `noise`)^2."""
    from accelvit.gradbias import Group

    gen = torch.Generator().manual_seed(seed)
    mu = torch.ones(size) / size**0.5
    b = torch.zeros(size)
    b[0] = bias
    g = mu + noise / size**0.5 * torch.randn(k, size, generator=gen)
    s = g + b + extra * noise / size**0.5 * torch.randn(k, size, generator=gen)
    seconds = torch.tensor([[1.0, 0.5 + 0.1 * (i % 2)] for i in range(k)], dtype=torch.float64)
    return {
        "groups": [Group("all", 0, size)],
        "full": g,
        "strategies": [(Setting(0.5, 4), s)],
        "seconds": seconds,
        "timed": torch.ones(k, dtype=torch.float64),
    }


def test_statistics_equal_their_pairwise_definitions():
    raw = synthetic(k=5, bias=0.3, noise=1.0, seed=0)
    (row,) = summarize(raw)
    g, s = raw["full"].double(), raw["strategies"][0][1].double()
    d = s - g
    pairs = [(i, j) for i in range(5) for j in range(5) if i != j]
    assert row["bias_sq"] == pytest.approx(sum(d[i] @ d[j] for i, j in pairs).item() / 20)
    assert row["bias_sq_plain"] == pytest.approx(d.mean(0).square().sum().item())
    assert row["variance"] == pytest.approx(s.var(0, unbiased=True).sum().item())
    mean_g_sq = sum(g[i] @ g[j] for i, j in pairs).item() / 20
    assert row["relative_bias"] == pytest.approx((row["bias_sq"] / mean_g_sq) ** 0.5)
    assert row["relative_bias_plain"] == pytest.approx((d.mean(0).norm() / g.mean(0).norm()).item())
    # the delete-one jackknife, written out
    loo = []
    for out in range(5):
        rest = [i for i in range(5) if i != out]
        loo.append(sum(d[i] @ d[j] for i in rest for j in rest if i != j).item() / 12)
    loo = torch.tensor(loo)
    assert row["bias_sq_se"] == pytest.approx((4 / 5 * (loo - loo.mean()).square().sum()).sqrt().item())
    assert row["cost"] == pytest.approx((0.5 * 3 + 0.6 * 2) / 5)  # time of the strategy over full input
    assert row["cost_se"] == pytest.approx(torch.tensor([0.5, 0.6] * 2 + [0.5]).std().item() / 5**0.5)


def test_corrected_relative_bias_is_not_fooled_by_batch_noise():
    # K = 4, tr Cov(g) / K = 0.9 ||E g||^2 and a noisier difference: an 18% bias reads over 100% plain
    plain, bias_sq = [], []
    for seed in range(1000):
        (row,) = summarize(synthetic(k=4, bias=0.18, noise=0.9**0.5 * 2, seed=seed, extra=2.0))
        plain.append(row["relative_bias_plain"])
        bias_sq.append(row["bias_sq"])
    assert sum(plain) / len(plain) > 1.0  # mostly noise
    assert sum(bias_sq) / len(bias_sq) == pytest.approx(0.18**2, abs=0.03)  # unbiased (spread 0.009)
    (row,) = summarize(synthetic(k=400, bias=0.18, noise=0.9**0.5 * 2, seed=0, extra=2.0))
    assert row["relative_bias"] == pytest.approx(0.18, abs=0.04)
    assert row["relative_bias_plain"] > 0.2
    assert row["cosine"] == pytest.approx(1 / (1 + 0.18**2) ** 0.5, abs=0.01)


def test_jackknife_standard_error_matches_the_spread_over_repetitions():
    rows = [summarize(synthetic(k=8, bias=0.3, noise=1.0, seed=seed))[0] for seed in range(300)]
    spread = torch.tensor([r["bias_sq"] for r in rows]).std().item()
    mean_se = sum(r["bias_sq_se"] for r in rows) / len(rows)
    assert mean_se == pytest.approx(spread, rel=0.25)
    spread = torch.tensor([r["ca_mse"] for r in rows]).std().item()
    assert sum(r["ca_mse_se"] for r in rows) / len(rows) == pytest.approx(spread, rel=0.25)
    (two,) = summarize(synthetic(k=2, bias=0.3, noise=1.0, seed=0))
    assert two["bias_sq_se"] is None and two["ca_mse_se"] is None  # K = 2 has no spread to measure


# ---------------------------------------------------------------------------------------------
# The descent criterion: expected loss decrease of one preconditioned step, per unit cost


def with_descent(
    raw: dict, precondition: torch.Tensor, lr: float, bend: float, noise: float | None = None, momentum: float = 0.0
) -> dict:
    noise = bend if noise is None else noise
    curvatures = {"curvature": bend, "curvature_noise": noise, "momentum": momentum}
    return raw | {"preconditioner": precondition, "lr": lr, **curvatures}


def test_descent_equals_its_pairwise_definition():
    raw = synthetic(k=5, bias=0.3, noise=1.0, seed=0)
    precondition = torch.linspace(0.5, 2.0, 400)
    (row,) = summarize(with_descent(raw, precondition, lr=0.1, bend=3.0, noise=0.5, momentum=0.9))
    g, s = raw["full"].double(), raw["strategies"][0][1].double()
    p = precondition.double()
    pairs = [(i, j) for i in range(5) for j in range(5) if i != j]

    def descent(x):
        first = sum(g[i] @ (p * x[j]) for i, j in pairs).item() / 20
        mean_sq = sum((p * x[i]) @ (p * x[j]) for i, j in pairs).item() / 20  # ||P E x||^2, unbiased
        noise = (p * x).var(0, unbiased=True).sum().item()  # tr Cov(P x)
        return 0.1 * first - 0.1**2 / 2 * (3.0 * mean_sq + 0.5 * noise * 0.1 / 1.9)  # momentum's noise

    assert row["descent"] == pytest.approx(descent(s))
    assert row["descent_full"] == pytest.approx(descent(g))
    assert row["descent_se"] > 0 and row["descent_full_se"] > 0
    # one curvature for both and no momentum: the second-order term is the plain mean of ||P x_k||^2
    (same,) = summarize(with_descent(raw, precondition, lr=0.1, bend=3.0))
    plain = sum((p * s[k]).square().sum() for k in range(5)).item() / 5
    first = sum(g[i] @ (p * s[j]) for i, j in pairs).item() / 20
    assert same["descent"] == pytest.approx(0.1 * first - 0.1**2 * 3.0 / 2 * plain)


def test_descent_charges_bias_and_noise_where_ca_mse_charges_cost():
    # same mean gradient: more noise costs descent through the second-order term
    quiet, noisy = (summarize(with_descent(synthetic(100, 0.0, n, 0, extra=1.0), torch.ones(400), 0.5, 2.0))[0]
                    for n in (0.5, 2.0))  # fmt: skip
    assert noisy["descent"] < quiet["descent"]
    # a bias against the mean gradient costs first-order descent
    raw = synthetic(100, 0.0, 0.5, 0, extra=0.0)
    mu = raw["full"].mean(0)
    against = raw | {"strategies": [(Setting(0.5, 4), raw["full"] - 0.5 * mu)]}
    (row,) = summarize(with_descent(against, torch.ones(400), 0.1, 0.0))  # no curvature: first order only
    assert row["descent"] == pytest.approx(0.5 * row["descent_full"], rel=0.05)


class Quadratic(torch.nn.Module):
    """loss = a / 2 ||w - x||^2 for a batch x: gradient a (w - x), curvature a along every direction."""

    def __init__(self, a: float) -> None:
        super().__init__()
        self.a, self.w = a, torch.nn.Parameter(torch.zeros(6))

    def forward(self, views, setting, progress):
        return self.a / 2 * (self.w - views[0].mean(0)).square().sum()


def test_curvature_is_the_secant_along_the_update_and_leaves_the_weights():
    from accelvit.gradbias import curvature, gradient

    model = Quadratic(3.0)
    views = [torch.randn(4, 6)]
    g0, _ = gradient(model, [model.w], views, Setting(1.0, 4), 0.0)
    update = torch.randn(6)
    assert curvature(model, [model.w], views, Setting(1.0, 4), 0.0, g0, update, 0.01) == pytest.approx(3.0)
    assert torch.equal(model.w.detach(), torch.zeros(6))
    negative = Quadratic(-1.0)  # the loss bends down: no second-order penalty, rather than a reward
    g0, _ = gradient(negative, [negative.w], views, Setting(1.0, 4), 0.0)
    assert curvature(negative, [negative.w], views, Setting(1.0, 4), 0.0, g0, update, 0.01) == 0.0


def test_preconditioner_is_adamws_from_its_state_or_from_the_batches():
    from accelvit.gradbias import ADAM_EPS, preconditioner

    w = torch.nn.Parameter(torch.ones(3))
    full = torch.tensor([[1.0, 2.0, 0.0], [3.0, 2.0, 0.0]])
    p, source = preconditioner([w], full, None)
    assert source == "batches"
    torch.testing.assert_close(p, 1 / (torch.tensor([5.0, 4.0, 0.0]).sqrt() + ADAM_EPS))
    optimizer = torch.optim.AdamW([w], betas=(0.9, 0.99))
    for g in full:
        w.grad = g.clone()
        optimizer.step()
    p, source = preconditioner([w], full, optimizer)
    v = (0.01 * 0.99 * full[0] ** 2 + 0.01 * full[1] ** 2) / (1 - 0.99**2)  # bias-corrected
    assert source == "optimizer"
    torch.testing.assert_close(p, 1 / (v.sqrt() + ADAM_EPS))


def test_a_measured_report_has_descent_lr_and_curvature(tiny_config):
    from accelvit.build import estimate

    report = estimate(tiny_config, [Setting(0.5, 4)], num_batches=3)
    (row,) = report["strategies"]
    assert report["lr"] > 0 and report["curvature"] >= 0 and report["curvature_noise"] >= 0
    assert report["curvature_s"] > 0 and report["momentum"] == 0.9
    assert report["preconditioner_from"] == "batches"
    assert all(isinstance(row[k], float) for k in ("descent", "descent_se", "descent_full", "descent_full_se"))
