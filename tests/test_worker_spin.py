"""The worker polls for its next call for a moment after a result (COMFY_ENV_WORKER_SPIN_US):
only in pools with fewer workers than CPUs, only while the calls it polls for come in time,
and it tries again now and then after it stopped."""
from __future__ import annotations

import os

import pytest

import _funcs
from comfy_env import IsolatedExecutor, settings
from comfy_env import worker as worker_mod
from comfy_env.executor import executor as executor_mod


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = _Clock()
    monkeypatch.setattr(worker_mod.time, "perf_counter", c)
    return c


def _round(policy, clock, gap):
    """A result goes out, the worker waits, a call comes ``gap`` s later: what it polled."""
    policy.result_sent()
    spun = policy.before_recv()
    clock.now += gap
    policy.call_came()
    return round(spun * 1e6)          # microseconds


def test_a_worker_polls_while_calls_come_in_time_and_probes_after_it_stopped(clock):
    p = worker_mod._SpinPolicy(300)
    assert p.before_recv() == 0.0                       # the first call: nothing to poll for
    p.call_came()
    assert [_round(p, clock, 30e-6) for _ in range(3)] == [300] * 3
    assert _round(p, clock, 5e-3) == 300                # polled, but the call came late
    assert _round(p, clock, 30e-6) == 300               # one late call is not enough
    assert [_round(p, clock, 5e-3) for _ in range(2)] == [300, 300]     # two in a row are
    # Now it sleeps, and polls again once every PROBE_EVERY results.
    n = worker_mod._SpinPolicy.PROBE_EVERY
    spins = [_round(p, clock, 5e-3) for _ in range(2 * n)]
    assert spins.count(300) == 2 and spins[n - 1] == 300, spins
    # A probe that catches its call turns polling back on.
    spins = [_round(p, clock, 30e-6) for _ in range(n + 3)]
    assert spins[-3:] == [300] * 3, spins


def test_a_worker_told_0_never_polls(clock):
    p = worker_mod._SpinPolicy(0)
    assert [_round(p, clock, 1e-6) for _ in range(20)] == [0] * 20


def test_workers_poll_only_when_they_are_fewer_than_the_cpus(monkeypatch):
    values = settings.read({"COMFY_ENV_WORKER_SPIN_US": "100"})
    assert settings.read({}).worker_spin_us == 300
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert executor_mod._worker_spin_us(values, 1) == 100
    assert executor_mod._worker_spin_us(values, 3) == 100
    assert executor_mod._worker_spin_us(values, 4) == 0
    assert executor_mod._worker_spin_us(values, 8) == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert executor_mod._worker_spin_us(values, 1) == 0


def test_a_bad_spin_setting_is_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv("COMFY_ENV_WORKER_SPIN_US", "-5")
    with pytest.raises(settings.SettingsError, match="COMFY_ENV_WORKER_SPIN_US"):
        IsolatedExecutor()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("spin", ["0", "300"])
def test_calls_are_right_whether_the_worker_polls_or_sleeps(monkeypatch, spin):
    monkeypatch.setenv("COMFY_ENV_WORKER_SPIN_US", spin)
    with IsolatedExecutor(max_workers=1) as ex:
        assert ex._pool.worker_spin_us == (int(spin) if len(os.sched_getaffinity(0)) > 1 else 0)
        assert [ex.submit(_funcs.add, i, 1).result(30) for i in range(300)] == \
            [i + 1 for i in range(300)]
        futs = [ex.submit(_funcs.add, i, 2) for i in range(300)]
        assert [f.result(30) for f in futs] == [i + 2 for i in range(300)]


def test_a_sleeping_worker_polls_again_as_soon_as_a_call_came_within_the_spin_time(clock):
    """Calls after a pause (a node graph queued again, a benchmark's next block): the
    gap of a call the worker slept through holds its own wake-up, so one measured within
    the spin time means the calls come fast again; waiting for the next probe would sleep
    through up to PROBE_EVERY of them."""
    p = worker_mod._SpinPolicy(300)
    p.call_came()
    assert [_round(p, clock, 5e-3) for _ in range(4)] == [300, 300, 0, 0]   # asleep now
    assert _round(p, clock, 100e-6) == 0               # slept, but the call came in time
    assert [_round(p, clock, 100e-6) for _ in range(3)] == [300] * 3
    assert [_round(p, clock, 400e-6) for _ in range(4)] == [300, 300, 0, 0]  # slow again
