"""Figures and tables written for people: schedule plots (more reports join later)."""

from __future__ import annotations

from pathlib import Path

from accelvit.budget import ScheduleRow


def format_schedule(rows: list[ScheduleRow], mean: float) -> str:
    """A plain-text table of the schedule and its mean relative cost."""
    lines = [f"{'progress':>8} {'step':>7} {'keep':>6} {'patch':>5} {'tokens':>6} {'cost':>6}"]
    for r in rows:
        lines.append(
            f"{r.progress:8.2f} {r.step:7d} {r.setting.keep:6.3f} {r.setting.patch:5d} "
            f"{r.tokens:6d} {r.cost:6.3f}"
        )
    lines.append(f"mean relative cost {mean:.3f} ({1 / mean:.2f}x fewer backbone FLOPs than no compression)")
    return "\n".join(lines)


def plot_schedule(rows: list[ScheduleRow], path: Path, title: str = "") -> Path:
    """Keep ratio, patch size and relative cost against progress, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    progress = [r.progress for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(6, 6), sharex=True)
    for ax, values, label in (
        (axes[0], [r.setting.keep for r in rows], "keep ratio"),
        (axes[1], [r.setting.patch for r in rows], "patch size"),
        (axes[2], [r.cost for r in rows], "relative cost"),
    ):
        ax.step(progress, values, where="post")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("training progress")
    if title:
        axes[0].set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
