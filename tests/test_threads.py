"""train.num_threads: an explicit value is used as given; 0 chooses the idle CPUs of this process
(affinity, cgroup quota, other programs' load from /proc/stat) shared by the node's processes."""
from __future__ import annotations

import pytest
import torch

import engine.threads as T


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _fake_cpu(monkeypatch, cpus: set[int], busy: dict[int, float], quota=None):
    """CPUs ``cpus`` of which other programs keep cpu c busy ``busy[c]`` of the time."""
    calls = {"n": 0}

    def times(wanted):
        calls["n"] += 1
        k = calls["n"]  # the second sample is 1000 jiffies later per CPU
        return {c: (int(1000 * k * busy.get(c, 0.0)), 1000 * k) for c in wanted}

    monkeypatch.setattr(T.os, "sched_getaffinity", lambda pid: set(cpus))
    monkeypatch.setattr(T, "_cpu_times", times)
    monkeypatch.setattr(T, "_cgroup_cpu_limit", lambda: quota)
    monkeypatch.setattr(T.time, "sleep", lambda s: None)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)


@pytest.mark.parametrize("busy, quota, processes, expect", [
    ({}, None, None, 4),                      # idle: every CPU
    ({0: 1.0}, None, None, 3),                # one CPU taken by another program
    ({0: 1.0, 1: 1.0, 2: 0.9}, None, None, 1),  # 1.1 idle -> 1
    ({0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}, None, None, 1),  # all busy: still 1
    ({0: 0.5, 1: 0.5}, None, None, 3),        # 3 idle CPUs' worth
    ({}, 2.0, None, 2),                       # cgroup quota of 2 CPUs
    ({}, None, 2, 2),                         # 2 processes on the node share 4 idle CPUs
    ({0: 1.0}, None, 3, 1),
])
def test_auto_num_threads(monkeypatch, busy, quota, processes, expect):
    _fake_cpu(monkeypatch, {0, 1, 2, 3}, busy, quota)
    assert T.auto_num_threads(processes=processes) == expect


def test_auto_num_threads_reads_local_world_size(monkeypatch):
    _fake_cpu(monkeypatch, {0, 1, 2, 3}, {})
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert T.auto_num_threads() == 1


def test_cpu_times_parses_proc_stat():
    import os
    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc/stat")
    cpus = os.sched_getaffinity(0)
    times = T._cpu_times(cpus)
    assert set(times) == cpus
    assert all(0 <= busy <= total for busy, total in times.values())


def test_apply_num_threads(monkeypatch):
    _fake_cpu(monkeypatch, {0, 1, 2, 3}, {0: 1.0, 1: 1.0})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert T.apply_num_threads(3, torch.device("cpu")) == 3       # explicit
    assert T.apply_num_threads(0, torch.device("cpu")) == 2       # automatic: 2 idle CPUs
    torch.set_num_threads(3)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert T.apply_num_threads(0, torch.device("cpu")) == 3       # the environment's choice stands
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert T.apply_num_threads(0, torch.device("cuda")) == 3      # not on GPUs


class _Clock:
    def __init__(self):
        self.wall, self.own, self.busy = 0.0, 0.0, 0.0  # seconds; busy = all CPUs' busy CPU-seconds


def _fake_running(monkeypatch, clock: _Clock, cpus=(0, 1, 2, 3)):
    monkeypatch.setattr(T.os, "sched_getaffinity", lambda pid: set(cpus))
    monkeypatch.setattr(T, "_cgroup_cpu_limit", lambda: None)
    monkeypatch.setattr(T.os, "sysconf", lambda name: 100)
    monkeypatch.setattr(T.time, "monotonic", lambda: clock.wall)
    monkeypatch.setattr(T.time, "process_time", lambda: clock.own)
    # busy time spread evenly over the CPUs, in jiffies (100 per second)
    monkeypatch.setattr(T, "_cpu_times", lambda wanted: {
        c: (int(100 * clock.busy / len(cpus)), int(100 * clock.wall)) for c in wanted})
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)


def _advance(clock: _Clock, seconds: float, own_threads: float, others: float):
    clock.wall += seconds
    clock.own += seconds * own_threads
    clock.busy += seconds * (own_threads + others)


def _auto_threads(monkeypatch, interval_s: float):
    """``(clock, AutoThreads(interval_s))`` on a fake clock, this process at 4 threads."""
    clock = _Clock()
    _fake_running(monkeypatch, clock)
    torch.set_num_threads(4)
    return clock, T.AutoThreads(interval_s=interval_s)


def test_auto_threads_follow_other_programs_during_training(monkeypatch):
    clock, auto = _auto_threads(monkeypatch, 10.0)
    _advance(clock, 5, own_threads=4, others=0)
    assert auto.maybe_update() is None                       # not yet due
    _advance(clock, 5, own_threads=3, others=1)              # a program took a CPU: 10 s, others 0.5 on average
    assert auto.maybe_update() is None and torch.get_num_threads() == 4   # round(4 - 0.5) = 4 (3.5 rounds up)
    _advance(clock, 10, own_threads=3, others=2)             # two programs now
    assert auto.maybe_update() == 2 and torch.get_num_threads() == 2
    _advance(clock, 10, own_threads=2, others=2)
    assert auto.maybe_update() is None                       # unchanged
    _advance(clock, 10, own_threads=2, others=0)             # they ended
    assert auto.maybe_update() == 4 and torch.get_num_threads() == 4
    _advance(clock, 10, own_threads=4, others=9)             # more than the CPUs: still one thread
    assert auto.maybe_update() == 1


def test_auto_threads_off_with_zero_interval(monkeypatch):
    clock, auto = _auto_threads(monkeypatch, 0.0)
    _advance(clock, 100, own_threads=1, others=4)
    assert auto.maybe_update() is None and torch.get_num_threads() == 4
