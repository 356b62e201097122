"""Figures and tables written for people: schedule plots (more reports join later)."""

from __future__ import annotations

import math
from pathlib import Path

from accelvit.budget import ScheduleRow, mean_cost
from accelvit.config import ConfigError
from accelvit.setting import setting_of


def format_schedule(
    rows: list[ScheduleRow],
    every: list[ScheduleRow],
    global_batch: int,
    measured: list[ScheduleRow] | None = None,
) -> str:
    """The schedule at a few steps (`rows`), and totals over every step of the run (`every`).

    Units: budget units per image of a step; cost: relative to the same step without compression.
    `measured`: the same run simulated with costs timed on this machine.
    """
    names = {"progress": 8, "step": 8, "keep": 6, "patch": 5, "merge": 5, "tokens": 6, "units": 7, "cost": 6}
    lines = [" ".join(f"{name:>{width}}" for name, width in names.items())]
    for r in rows:
        s = r.setting
        lines.append(
            f"{r.progress:8.3f} {r.step:8d} {s.keep:6.3f} {s.patch:5d} {s.merge:5.2f} "
            f"{r.tokens:6d} {r.units:7.3f} {r.cost:6.3f}"
        )
    for label, run in (("flops", every), ("measured", measured or [])):
        if run:
            mean = mean_cost(run)
            spent = sum(r.units for r in run) * global_batch
            lines.append(
                f"{label}: {len(run)} steps, {spent:.4g} budget units, "
                f"mean relative cost {mean:.3f} ({1 / mean:.2f}x cheaper steps than no compression)"
            )
    return "\n".join(lines)


def plot_schedule(rows: list[ScheduleRow], path: Path, title: str = "") -> Path:
    """Keep ratio, patch size, merge fraction (if any) and relative cost against progress, as a PNG."""
    plt = pyplot()

    progress = [r.progress for r in rows]
    series = [([r.setting.keep for r in rows], "keep ratio"), ([r.setting.patch for r in rows], "patch size")]
    if any(r.setting.merge for r in rows):
        series.append(([r.setting.merge for r in rows], "merge per block"))
    series.append(([r.cost for r in rows], "relative cost"))
    fig, axes = plt.subplots(len(series), 1, figsize=(6, 2 * len(series)), sharex=True)
    for ax, (values, label) in zip(axes, series, strict=True):
        ax.step(progress, values, where="post")
        value_axis(ax, values, label)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("training progress")
    if title:
        axes[0].set_title(title)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# Gradient-error reports

GRAD_COLUMNS = (
    "keep",
    "patch",
    "merge",
    "flops",
    "cost",
    "cost_se",
    "bias_sq",
    "bias_sq_se",
    "relative_bias",
    "relative_bias_plain",
    "variance",
    "cosine",
    "cosine_plain",
    "ca_mse",
    "ca_mse_se",
)


def grad_table(report: dict) -> str:
    """Markdown table of one grad-error report; the lowest CA-MSE is marked."""
    rows = report["strategies"]
    best = min(range(len(rows)), key=lambda i: rows[i]["ca_mse"])
    head = (
        f"grad-error of {report['objective']} on {report['dataset']} at step {report['step']} "
        f"(progress {report['progress']:.2f}), K={report['batches']} batches of {report['batch_size']}, "
        f"{report['processes']} process(es); full-input variance "
        f"{rows[0]['variance_full']:.4g}; *_se: standard errors over the batches; relative_bias and cosine "
        "are bias-corrected (empty where batch noise swamps the mean gradient), *_plain are not\n\n"
    )
    lines = ["| " + " | ".join(GRAD_COLUMNS) + " |", "|" + "---|" * len(GRAD_COLUMNS)]
    ca_mse = GRAD_COLUMNS.index("ca_mse")
    for i, row in enumerate(rows):
        cells = [_fmt(row.get(c)) for c in GRAD_COLUMNS]
        if i == best:
            cells[ca_mse] = f"**{cells[ca_mse]}** (best)"
        lines.append("| " + " | ".join(cells) + " |")
    groups = report["groups"]
    glines = [
        "",
        "bias² per parameter group:",
        "",
        "| strategy | " + " | ".join(groups) + " |",
        "|" + "---|" * (len(groups) + 1),
    ]
    for row in rows:
        cells = [_fmt(row["groups"][g]["bias_sq"]) for g in groups]
        glines.append(f"| {setting_of(row).label} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines + glines) + "\n"


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def plot_grad_report(reports: list[dict], path: Path, labels: list[str]) -> Path:
    """bias² and CA-MSE against cost, one marker series per report; full input drawn as the reference
    (bias² 0, CA-MSE its variance at cost 1)."""
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = (("bias_sq", "bias² (unbiased estimate)"), ("ca_mse", "CA-MSE = bias² + cost × variance"))
    references = []
    for report, label in zip(reports, labels, strict=True):
        rows = report["strategies"]
        cost = [r["cost"] for r in rows]
        for ax, (key, _) in zip(axes, panels, strict=True):
            dots = ax.scatter(cost, [r[key] for r in rows], label=label)
            for r, c in zip(rows, cost, strict=True):
                ax.annotate(setting_of(r).label, (c, r[key]), (3, 3), textcoords="offset points", fontsize=7)
        full = rows[0]["variance_full"]  # full input's CA-MSE: no bias, all of its variance
        axes[1].axhline(full, color=dots.get_facecolor()[0], linestyle="--", linewidth=1)
        references.append(full)
    axes[0].axhline(0.0, color="grey", linestyle="--", linewidth=1, label="full input (dashed)")
    for ax, (key, title) in zip(axes, panels, strict=True):
        values = [r[key] for rep in reports for r in rep["strategies"]]
        value_axis(ax, values + (references if key == "ca_mse" else [0.0]), title.split(" ")[0])
        ax.set_title(title)
        ax.set_xlabel("cost relative to the full step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return save_figure(fig, path)


def write_grad_report(report: dict, path: Path) -> list[Path]:
    """REPORT.json plus REPORT.md and REPORT.png beside it."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    md = path.with_suffix(".md")
    md.write_text(grad_table(report))
    png = plot_grad_report([report], path.with_suffix(".png"), [path.stem])
    return [path, md, png]


def load_grad_report(path: Path, schema: str) -> dict:
    import json

    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable grad-error report ({exc})") from None
    if not isinstance(report, dict):
        raise ConfigError(f"{path}: a grad-error report is a JSON object, got {type(report).__name__}")
    if report.get("schema") != schema:
        raise ConfigError(f"{path}: report schema {report.get('schema')!r}, this accelvit reads {schema!r}")
    missing = [k for k in REPORT_KEYS if k not in report]
    rows = report.get("strategies")
    if missing or not isinstance(rows, list) or not rows:
        raise ConfigError(f"{path}: not a complete grad-error report (missing {missing or ['strategies']})")
    for i, row in enumerate(rows):
        absent = [k for k in ROW_KEYS if not isinstance(row, dict) or k not in row]
        if absent:
            raise ConfigError(f"{path}: strategies[{i}] lacks {absent}")
    return report


REPORT_KEYS = ("model", "objective", "step", "progress", "batches", "strategies")
ROW_KEYS = ("keep", "patch", "cost", "flops", "bias_sq", "variance", "variance_full", "ca_mse")


def compare_table(reports: list[dict], labels: list[str]) -> str:
    """Strategies x reports for bias², relative bias, cosine, CA-MSE and cost; best per report marked."""
    keys = sorted(
        {setting_of(r) for rep in reports for r in rep["strategies"]},
        key=lambda s: (s.patch, -s.keep, s.merge),
    )
    out = []
    for metric in ("bias_sq", "relative_bias", "cosine", "ca_mse", "cost"):
        out += [
            f"### {metric}",
            "",
            "| strategy | " + " | ".join(labels) + " |",
            "|" + "---|" * (len(labels) + 1),
        ]
        for setting in keys:
            cells = []
            for rep in reports:
                row = {setting_of(r): r for r in rep["strategies"]}.get(setting)
                best = min(rep["strategies"], key=lambda r: r["ca_mse"])
                cell = _fmt(row[metric]) if row else ""
                if row is best and metric == "ca_mse":
                    cell = f"**{cell}**"
                cells.append(cell)
            out.append(f"| {setting.label} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Attention diagnostics


def diagnostics_table(runs: dict[str, list[dict]]) -> str:
    """The last diagnostics record of each run, a row per block."""
    lines = [f"{'run':>16} {'step':>7} {'block':>5} {'entropy':>8} {'attn_cond':>10} {'block_cond':>10}"]
    for label, records in runs.items():
        last = records[-1]
        for b in last["blocks"]:
            lines.append(
                f"{label[-16:]:>16} {last['step']:7d} {b['block']:5d} {b['entropy']:8.4f} "
                f"{b['attn_cond']:10.3g} {b['block_cond']:10.3g}"
            )
    return "\n".join(lines)


def plot_diagnostics(runs: dict[str, list[dict]], path: Path) -> Path:
    """Entropy and condition numbers per block against training progress, one line style per run."""
    plt = pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    styles = ["-", "--", ":", "-."]
    for r, (label, records) in enumerate(runs.items()):
        progress = [rec["progress"] for rec in records]
        for block in range(len(records[0]["blocks"])):
            color = plt.cm.viridis(block / max(1, len(records[0]["blocks"]) - 1))
            for ax, key in zip(axes, ("entropy", "attn_cond", "block_cond"), strict=True):
                values = [rec["blocks"][block][key] for rec in records]
                name = f"{label} block {block}" if key == "entropy" else None
                ax.plot(progress, values, styles[r % len(styles)], color=color, label=name)
    titles = ("attention entropy / log N", "cond(attention output)", "cond(block output)")
    for ax, key, title in zip(axes, ("entropy", "attn_cond", "block_cond"), titles, strict=True):
        values = [b[key] for records in runs.values() for rec in records for b in rec["blocks"]]
        value_axis(ax, values, title.split(" ")[0] if key == "entropy" else title)
        ax.set_title(title)
        ax.set_xlabel("training progress")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    return save_figure(fig, path)


def plot_runs(runs: dict[str, list[dict]], path: Path) -> Path:
    """Loss, learning rate, compression (keep, patch, merge) and kNN top-1 against budget spent, one
    line per run: a picture of runs from their metrics.jsonl records."""
    plt = pyplot()

    panels = [("loss", "loss"), ("lr", "learning rate"), ("keep", "keep ratio"), ("patch", "patch size")]
    if any(r.get("merge") for records in runs.values() for r in records):
        panels.append(("merge", "merge per block"))
    panels.append(("knn_top1", "kNN top-1"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 1.9 * len(panels)), sharex=True)
    for label, records in runs.items():
        logged = [r for r in records if "loss" in r]
        budget = {r["step"]: r["budget_spent"] for r in logged}
        for ax, (key, _) in zip(axes, panels, strict=True):
            if key == "knn_top1":  # evaluation lines carry a step only: place them at its budget
                scored = [r for r in records if key in r and r["step"] in budget]
                ax.plot([budget[r["step"]] for r in scored], [r[key] for r in scored], "o-", label=label)
            else:
                ax.plot([r["budget_spent"] for r in logged], [r.get(key, 0.0) for r in logged], label=label)
    for ax, (key, name) in zip(axes, panels, strict=True):
        values = [r[key] for records in runs.values() for r in records if r.get(key) is not None]
        value_axis(ax, values, name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[-1].set_xlabel("budget spent (units)")
    return save_figure(fig, path)


def value_axis(ax, values: list, label: str) -> None:
    """A labelled y axis whose ticks always read: log over more than a decade of positive values,
    else linear without an offset (a symlog axis over one decade shows no tick; an offset axis reads
    `1e-5+9.999e-1`)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) > 10 * min(finite):
        ax.set_yscale("log")
    else:
        ax.ticklabel_format(axis="y", useOffset=False, style="sci", scilimits=(-3, 4))
    ax.set_ylabel(label)


def pyplot():
    """matplotlib's pyplot on its file-only backend, imported when a figure is drawn, not at start-up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_path(path: Path) -> Path:
    """Where a figure asked for at `path` goes: matplotlib adds .png to a name without a suffix."""
    return path if path.suffix else path.with_name(path.name + ".png")


def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path = figure_path(path)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
