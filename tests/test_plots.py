"""Every figure accelvit draws has labelled axes whose ticks read (no bare symlog decade, no offset)."""

from __future__ import annotations

import pytest

import accelvit.report as report
from accelvit.cli import main


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions save, drawn, instead of their files."""
    drawn = []

    def keep(fig, path):
        fig.canvas.draw()
        drawn.append(fig)
        return path

    monkeypatch.setattr(report, "save_figure", keep)
    return drawn


def assert_readable(fig) -> None:
    for ax in fig.axes:
        assert ax.get_ylabel(), ax.get_title()
        low, high = sorted(ax.get_ylim())
        ticks = [
            t.get_text()
            for t, at in zip(ax.get_yticklabels(), ax.get_yticks(), strict=True)
            if low <= at <= high and t.get_text()
        ]
        minor = [t.get_text() for t in ax.get_yticklabels(minor=True) if t.get_text()]
        assert len(ticks) + len(minor) >= 2, (ax.get_ylabel(), ticks, minor)
        assert "+" not in ax.yaxis.get_offset_text().get_text()  # 1e-5+9.999e-1 reads nothing
    assert fig.axes[-1].get_xlabel()


def grad_report(values: list[float], variance: float) -> dict:
    rows = [
        {"keep": keep, "patch": patch, "cost": cost, "bias_sq": bias, "ca_mse": bias + cost * variance, "variance_full": variance}
        for (keep, patch, cost), bias in zip([(1.0, 4, 1.0), (0.5, 4, 0.5), (1.0, 8, 0.25)], values, strict=True)
    ]
    return {"strategies": rows}


def test_grad_error_plot_within_one_decade_and_with_a_negative_estimate(figures, tmp_path):
    report.plot_grad_report([grad_report([0.0, 2.1e-4, 3.0e-4], 1.1e-3)], tmp_path / "a.png", ["a"])
    report.plot_grad_report([grad_report([-1e-9, 2e-6, 5e-3], 1e-4)], tmp_path / "b.png", ["b"])
    for fig in figures:
        assert_readable(fig)
        # full input is drawn as the reference: a dashed line in each panel
        assert all(any(line.get_linestyle() == "--" for line in ax.get_lines()) for ax in fig.axes)


def test_diagnostics_plot_of_entropies_within_1e5_of_one(figures, tmp_path):
    blocks = [{"entropy": 0.99999 + 1e-6 * i, "attn_cond": 3.0 + i, "block_cond": 40.0 + i} for i in range(2)]
    records = [{"progress": p, "blocks": blocks} for p in (0.0, 0.5, 1.0)]
    report.plot_diagnostics({"run": records}, tmp_path / "d.png")
    assert_readable(figures[0])


def test_plot_command_draws_runs_side_by_side(tmp_path, tiny_recipe, capsys, figures):
    from accelvit.checkpoint import create_run_dir
    from accelvit.config import load_config
    from accelvit.train import pretrain

    runs = []
    for name, sets in (("a", []), ("b", ["schedule.keep=1.0", "schedule.patch=4", "train.eval_every=3"])):
        cfg = load_config(tiny_recipe, sets)
        create_run_dir(tmp_path / name, cfg)
        pretrain(cfg, tmp_path / name)
        runs.append(str(tmp_path / name))
    assert main(["plot", *runs, "-o", str(tmp_path / "runs.png")]) == 0
    fig = figures[0]
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss", "learning rate", "keep ratio", "patch size", "kNN top-1"]
    assert [len(ax.get_lines()) for ax in fig.axes] == [2, 2, 2, 2, 2]
    assert len(fig.axes[-1].get_lines()[1].get_xdata()) == 2  # run b's kNN at steps 3 and 6
    assert_readable(fig)
    assert main(["plot", str(tmp_path), "-o", str(tmp_path / "x.png")]) == 2
