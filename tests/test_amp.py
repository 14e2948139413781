"""SegEngine.train under AMP's loss scaling: one GradScaler per engine (its scale carries over between calls),
steps the scaler skips (inf/NaN gradients) are not counted, and the loop stops at 2x the requested steps.

This machine has no CUDA, so autocast's float16 is not exercised here: the tests use torch's real GradScaler
on the CPU (same skip-and-lower-the-scale logic) and make gradients inf with a gradient hook on chosen
batches. AMP on a GPU is untested by this file."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import TINY_ENGINE

from fedseg.data import load_datalist
from fedseg.engine import EngineConfig, SegEngine
from fedseg.engine.config import resolve_engine


def amp_engine(data) -> SegEngine:
    cfg = EngineConfig.from_dict(resolve_engine(TINY_ENGINE))
    engine = SegEngine(cfg, load_datalist(str(data / "site-1" / "datalist.json")), site="site-1")
    assert engine.scaler is not None and not engine.scaler.is_enabled()  # CPU: AMP off, the scaler a no-op
    engine.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)  # the real scaler, enabled
    return engine


def poison(net: torch.nn.Module, bad_batches: set[int] | None) -> list[int]:
    """Make the gradients inf on the given batches (None: on every batch); returns the batch counter."""
    seen = [0]
    param = next(net.parameters())

    def hook(grad):
        batch = seen[0]
        seen[0] += 1
        return grad * float("inf") if bad_batches is None or batch in bad_batches else grad

    param.register_hook(hook)
    return seen


def adam_steps(optimizer) -> set[float]:
    return {float(state["step"]) for state in optimizer.state.values()}


def test_skipped_amp_steps_are_not_counted_and_the_scale_persists(tiny2d):
    engine = amp_engine(tiny2d)
    net = engine.new_network()
    optimizer = engine.new_optimizer(net)
    batches = poison(net, {1, 3})
    lrs, steps = [], []
    stats = engine.train(
        net, 5, optimizer=optimizer, lr_at_step=lambda i: lrs.append(i) or 1e-3, on_step=lambda i, loss: steps.append(i)
    )
    assert batches[0] == 7 and (stats.steps, stats.skipped) == (5, 2)  # 7 batches for 5 applied steps
    assert adam_steps(optimizer) == {5.0}  # Adam itself stepped 5 times: the skipped batches changed nothing
    assert steps == [0, 1, 2, 3, 4] and lrs == [0, 1, 1, 2, 2, 3, 4]  # a retried step keeps its position
    assert engine.scaler.get_scale() == 2.0**14  # halved once per skipped step

    scaler = engine.scaler
    stats = engine.train(net, 2, optimizer=optimizer)  # the next call goes on with the lowered scale
    assert engine.scaler is scaler and engine.scaler.get_scale() == 2.0**14 and (stats.steps, stats.skipped) == (2, 0)
    assert adam_steps(optimizer) == {7.0}


def test_amp_stops_at_twice_the_requested_steps_with_a_warning(tiny2d, caplog):
    engine = amp_engine(tiny2d)
    net = engine.new_network()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    batches = poison(net, None)
    with caplog.at_level(logging.WARNING, logger="fedseg.engine"):
        stats = engine.train(net, 3)
    assert batches[0] == 6 and (stats.steps, stats.skipped) == (0, 6)
    assert "AMP skipped 6 of 6 steps" in caplog.text and "stopping at 0 of 3 applied steps" in caplog.text
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # no step was applied
    assert engine.scaler.get_scale() == 2.0**10


def test_without_amp_a_non_finite_loss_is_still_an_error(tiny2d):
    cfg = EngineConfig.from_dict(resolve_engine(TINY_ENGINE))
    engine = SegEngine(cfg, load_datalist(str(tiny2d / "site-1" / "datalist.json")), site="site-1")
    net = engine.new_network()
    with torch.no_grad():
        next(net.parameters()).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"\[site site-1\] training loss became nan at step 0"):
        engine.train(net, 2)
