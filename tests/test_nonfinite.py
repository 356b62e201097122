"""Non-finite steps are decided on the device: a step reads nothing back to the host, a skipped step
changes nothing, and the host's counters come out as if it had checked every step."""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
from accelerate import Accelerator

from accelvit.build import build_optimizer
from accelvit.checkpoint import TrainState
from accelvit.config import OptimConfig
from accelvit.nonfinite import Guard
from accelvit.setting import Setting
from accelvit.step import train_step
from tests.test_objectives import MODEL, build, views

HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")


@contextlib.contextmanager
def no_host_reads():
    """Any tensor read back to the host inside the block fails (on a GPU each would wait for it)."""

    def refuse(name):
        def read(*args, **kwargs):
            raise AssertionError(f"Tensor.{name} inside a step")

        return read

    with pytest.MonkeyPatch.context() as m:
        for name in HOST_READS:
            m.setattr(torch.Tensor, name, refuse(name))
        yield


def snapshot(model, optimizer) -> dict:
    state = {f"param.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for i, s in enumerate(optimizer.state.values()):
        state.update({f"opt.{i}.{k}": v.clone() for k, v in s.items()})
    return state


def step(name: str, poisoned: bool, guard: Guard):
    model = build(name, **({"local_crops": 2} if name == "dino" else {}))
    accelerator = Accelerator(cpu=True)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2))
    x = views(name, local=2 if name == "dino" else 0)
    train_step(accelerator, model, optimizer, x, Setting(1.0, MODEL.patch_size), 0.3, 1.0, "no", guard)
    before = snapshot(model, optimizer)  # a first step, so AdamW has state to keep
    if poisoned:
        x[0][0, 0, 0, 0] = math.nan
    return (
        model,
        optimizer,
        before,
        lambda: train_step(
            accelerator, model, optimizer, x, Setting(1.0, MODEL.patch_size), 0.6, 1.0, "no", guard
        ),
    )


@pytest.mark.parametrize("name", ["simclr", "mocov3", "dino"])
def test_a_step_reads_nothing_back_and_a_nonfinite_one_changes_nothing(name):
    model, optimizer, before, run = step(name, True, Guard(torch.device("cpu"), "skip", 3))
    with no_host_reads():
        loss, _, ok, _ = run()
    assert not torch.isfinite(loss) and not ok
    after = snapshot(model, optimizer)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []  # weights, EMA encoder, batch-norm statistics, DINO's centre, AdamW's state


@pytest.mark.parametrize("name", ["simclr", "mocov3", "dino"])
def test_a_finite_step_updates_the_model_and_its_momentum_encoder(name):
    model, optimizer, before, run = step(name, False, Guard(torch.device("cpu"), "skip", 3))
    _, _, ok, _ = run()
    assert ok
    after = snapshot(model, optimizer)
    changed = {k.split(".")[1] for k in before if not torch.equal(before[k], after[k])}
    teacher = {"simclr": set(), "mocov3": {"momentum_backbone"}, "dino": {"teacher_backbone", "criterion"}}
    assert {"backbone", *teacher[name]} <= changed
    assert all(int(s["step"]) == 2 for s in optimizer.state.values())


def test_a_step_returns_the_stop_request_as_a_device_flag_without_reading_back():
    model, optimizer, _, _ = step("simclr", False, Guard(torch.device("cpu"), "skip", 3))
    accelerator, x = Accelerator(cpu=True), views("simclr", local=0)
    guard = Guard(torch.device("cpu"), "skip", 3)
    flags = []
    for requested in (False, True):
        with no_host_reads():
            *_, stop = train_step(
                accelerator, model, optimizer, x, Setting(1.0, MODEL.patch_size), 0.5, 1.0, "no", guard, requested
            )
        flags.append(stop)
    assert [float(f) for f in flags] == [0.0, 1.0]


def run_guard(policy: str, max_skipped: int, finite: list[bool], keep: int = 0):
    guard, state = Guard(torch.device("cpu"), policy, max_skipped), TrainState()
    oks = []
    for f in finite:
        before = (state.step, state.images_seen, state.budget_spent)
        oks.append(bool(guard.admit(torch.tensor(f))))
        state.step, state.images_seen, state.budget_spent = state.step + 1, state.images_seen + 8, 0.0
        guard.record(torch.tensor(0.0 if f else math.nan), torch.tensor(1.0), before, torch.tensor(0.0))
    return oks, guard.settle(state, keep), state


def test_skips_are_counted_on_the_host_as_the_device_made_them():
    oks, halted, state = run_guard("skip", 3, [True, False, False, True, False])
    assert oks == [True, False, False, True, False]
    assert halted is None
    assert (state.step, state.skipped, state.skipped_in_row) == (5, 3, 1)


def test_the_steps_after_a_halt_change_nothing_and_the_counters_go_back_before_it():
    oks, halted, state = run_guard("skip", 2, [True, False, False, True, True])
    assert oks == [True, False, False, False, False]  # halted at the 3rd: finite steps after it too
    assert halted.before == (2, 16, 0.0) and math.isnan(halted.loss)
    assert (state.step, state.images_seen, state.skipped, state.skipped_in_row) == (2, 16, 1, 1)


def test_policy_stop_halts_at_the_first_nonfinite_step():
    oks, halted, state = run_guard("stop", 10, [True, True, False, True])
    assert oks == [True, True, False, False]
    assert halted.before[0] == 2 and (state.step, state.skipped) == (2, 0)


def test_settle_keeps_the_last_steps_unread():
    guard, state = Guard(torch.device("cpu"), "skip", 5), TrainState()
    for i, f in enumerate([False, False]):
        guard.admit(torch.tensor(f))
        guard.record(torch.tensor(math.nan), torch.tensor(1.0), (i, 0, 0.0), torch.tensor(float(i == 1)))
    assert guard.settle(state, keep=1) is None
    assert (state.skipped, len(guard.pending), guard.stop_requested) == (1, 1, False)
    guard.settle(state)
    assert (state.skipped, state.skipped_in_row, guard.pending, guard.stop_requested) == (2, 2, [], True)


def test_an_optimizer_that_cannot_skip_on_the_device_still_skips():
    from accelvit.nonfinite import optimizer_step

    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)  # not fused: an older checkpoint's
    model(torch.ones(2, 4)).sum().backward()
    weights = copy.deepcopy(model.state_dict())
    optimizer_step(optimizer, torch.tensor(False))
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    optimizer_step(optimizer, torch.tensor(True))
    assert not torch.equal(weights["weight"], model.weight)
