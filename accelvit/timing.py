"""Timing a step on the device: the measured cost model (`cost.model: measured`).

The arithmetic of budgets lives in `accelvit.budget`; this module runs the objective to time each
setting a run can reach, once per run (stored in the run directory, so a resumed run counts alike).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list
from tqdm import tqdm

from accelvit.augment import batch_views
from accelvit.checkpoint import COSTS
from accelvit.compress import base_patch_size, forward_features
from accelvit.config import Config, patch_sizes
from accelvit.data import build_loader
from accelvit.objectives import buffer_restorer
from accelvit.schedule import ramp_values, setting_at
from accelvit.setting import Setting, snap_patch, stem_stride


def measured_settings(cfg: Config, candidates: Iterable[Setting] = ()) -> list[Setting]:
    """Settings to time: the patch sizes the run can use, each at keeps 0.25 ... 1 and its lowest keep,
    and, if it merges tokens, at merge 0, 0.1, ... up to its largest merge fraction."""
    image_size, base, stride = cfg.model.image_size, cfg.model.patch_size, stem_stride(cfg.model.stem)
    allowed = patch_sizes(cfg.model)
    ramp = [setting_at(cfg.schedule, i / 100, image_size, base, stride) for i in range(101)]
    candidates = list(candidates)
    drawn = [snap_patch(p, allowed) for p in ramp_values(cfg.schedule.patch, base)]  # random ramps too
    low, high = min(s.patch for s in ramp), max(s.patch for s in ramp)
    low, high = min(low, *drawn), max(high, *drawn)
    patches = {p for p in allowed if low <= p <= high} | {c.patch for c in candidates} | {base}
    lowest_keep = min(min(s.keep for s in ramp), *ramp_values(cfg.schedule.keep))
    keeps = {0.25, 0.5, 0.75, 1.0} | {c.keep for c in candidates} | {lowest_keep}
    top = max(max(s.merge for s in ramp), *ramp_values(cfg.schedule.merge, 0.0))
    merges = {0.0, top} | {m for m in (0.1, 0.2, 0.3, 0.4) if m < top} | {c.merge for c in candidates}
    return [Setting(k, p, m) for p in sorted(patches) for m in sorted(merges) for k in sorted(keeps)]


def measure_costs(model, views: list, settings: list[Setting], repeats: int) -> list[dict]:
    """Time forward + backward of the objective `model` on `views` (one batch) at each setting.

    Units: the median step time over the median time of the backbone's uncompressed forward on the
    batch's first view, i.e. budget units per image. Buffers, gradients and RNG states are restored.
    """
    backbone, base = model.backbone, base_patch_size(model.backbone)
    restore_buffers = buffer_restorer(model)

    def median_time(fn: Callable[[], object]) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            _synchronize(views[0].device)
            tick = time.perf_counter()
            fn()
            _synchronize(views[0].device)
            times.append(time.perf_counter() - tick)
        return statistics.median(times)

    def step(setting: Setting) -> None:
        model(views, setting, 0.0).backward()
        model.zero_grad(set_to_none=True)
        restore_buffers()

    def unit_forward() -> None:
        with torch.no_grad():
            forward_features(backbone, views[0], Setting(1.0, base))

    with torch.random.fork_rng(devices=[views[0].device] if views[0].device.type == "cuda" else []):
        unit = median_time(unit_forward)
        return [
            {
                "keep": s.keep,
                "patch": s.patch,
                "merge": s.merge,
                "units": median_time(lambda s=s: step(s)) / unit,
            }
            for s in tqdm(settings, "timing step costs", leave=False, unit="setting")
        ]


def _synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_costs(path: Path, table: list[dict], device: str) -> None:
    path.write_text(json.dumps({"device": device, "costs": table}, indent=1) + "\n")


def read_costs(path: Path) -> list[dict]:
    return json.loads(path.read_text())["costs"]


def shared_cost_table(
    accelerator, model, images, pipeline, settings: list[Setting], cfg: Config, run_dir: Path
) -> list[dict]:
    """Step costs timed once per run on the main process and shared, so every process counts alike."""
    path = run_dir / COSTS
    if path.is_file():  # a resumed run keeps the costs it started with
        return read_costs(path)
    table = [None]
    if accelerator.is_main_process:
        keys = [(i % len(images), i) for i in range(cfg.train.batch_size)]
        transform, specs = pipeline
        loaded, _, _ = next(iter(build_loader(images, transform, 0, [keys])))
        views = batch_views(loaded, specs, cfg.train.seed, 0, 0, accelerator.device)
        with accelerator.autocast():
            table[0] = measure_costs(accelerator.unwrap_model(model), views, settings, cfg.cost.repeats)
        write_costs(path, table[0], str(accelerator.device))
    broadcast_object_list(table)
    return table[0]
