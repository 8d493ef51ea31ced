"""train.num_threads: an explicit value is used as given; 0 chooses the idle CPUs of this process
(affinity, cgroup quota, other programs' load from /proc/stat) shared by the node's processes."""
from __future__ import annotations

import pytest
import torch

import engine.trainer as T


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
