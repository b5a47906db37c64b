"""The VM instrument that times a step kernel by kernel (hetcomp.runtime.unit_time)."""

import pytest

from hetcomp.runtime import unit_time
from hetcomp.runtime.unit_time import SyncTimer


class _Device:
    def __init__(self):
        self.syncs = 0

    def sync(self):
        self.syncs += 1


def test_sync_timer_takes_its_own_time_off_every_call(monkeypatch):
    """Each call is timed between device syncs; the probe builtin (which does nothing)
    measures the timer's own time a call, taken off every call's, the probe's own to 0."""
    ticks = iter([0.0, 2e-6, 10e-6, 22e-6, 30e-6, 34e-6, 40e-6, 43e-6, 50e-6, 51e-6])
    monkeypatch.setattr(unit_time.time, "perf_counter", lambda: next(ticks))
    dev = _Device()
    timer = SyncTimer([dev])
    for symbol in (SyncTimer.PROBE, "linear", SyncTimer.PROBE, "linear", "tiny"):
        timer(None, symbol, True, None)
        timer(None, symbol, False, None)
    assert dev.syncs == 10 and timer.calls == {SyncTimer.PROBE: 2, "linear": 2, "tiny": 1}
    assert timer.own_seconds() == pytest.approx(3e-6)  # (2 + 4) / 2
    net = timer.net_seconds()
    assert net["linear"] == pytest.approx(12e-6 + 3e-6 - 2 * 3e-6)
    assert net[SyncTimer.PROBE] == pytest.approx(0.0, abs=1e-12)
    assert net["tiny"] == 0.0  # 1 us, under the timer's own: never negative
    timer.clear()
    assert timer.own_seconds() == 0.0 and timer.net_seconds() == {}


def test_breakdowns_time_the_timer_on_the_step_itself(tiny_artifact):
    """A compiled verify step calls the probe (TVM's KillAfterLastUse), so both breakdowns
    measure the timer's own time a call there and take it off."""
    from hetcomp.runtime import load_artifact

    art = load_artifact(tiny_artifact[0])
    b = unit_time.kernel_breakdown(art, 1, steps=2, cache_len=4)
    assert b["calls"][SyncTimer.PROBE] > 10 and b["timer_s"] > 0
    assert b["kernels"][SyncTimer.PROBE] == pytest.approx(0.0, abs=1e-12)
    assert unit_time.step_breakdown(art, 1, steps=2, cache_len=4)["timer_s"] > 0
