"""CPU threads of a training process (``train.num_threads``): chosen from the CPUs this process
may use and how busy other programs keep them, and re-chosen during training."""
from __future__ import annotations

import logging
import os
import time
from typing import Optional

import torch

log = logging.getLogger("engine")

__all__ = ["auto_num_threads", "AutoThreads", "apply_num_threads"]


def _cpu_times(cpus: set[int]) -> dict[int, tuple[int, int]]:
    """(busy, total) jiffies of each CPU in ``cpus`` from /proc/stat (Linux); {} elsewhere."""
    out = {}
    try:
        with open("/proc/stat") as f:
            for line in f:
                name, *vals = line.split()
                if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
                    continue
                v = [int(x) for x in vals[:8]]
                idle = v[3] + v[4]  # idle + iowait
                out[int(name[3:])] = (sum(v) - idle, sum(v))
    except (OSError, ValueError):
        return {}
    return out


def _cgroup_cpu_limit() -> Optional[float]:
    """CPUs allowed by a cgroup v2 / v1 quota, or None."""
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read())
        period = int(open("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def auto_num_threads(sample_s: float = 0.2, processes: Optional[int] = None) -> int:
    """CPU threads for one training process on a possibly shared machine: the CPUs it may run on
    (``os.sched_getaffinity``, capped by a cgroup quota), less the ones other programs keep busy
    (from /proc/stat over ``sample_s`` seconds), divided among the ``processes`` of this node
    (default ``LOCAL_WORLD_SIZE``, else 1); at least 1.

    Why: OpenMP threads meet at a barrier after every operator, so one thread that shares its core
    with another busy program holds all the others back; on a machine where other programs are
    busy, fewer threads than cores are faster (measured in benchmarks/pretrain_throughput.py
    ``--contention``)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    usable = float(len(cpus))
    limit = _cgroup_cpu_limit()
    if limit is not None:
        usable = min(usable, limit)
    if sample_s > 0:
        t0 = _cpu_times(cpus)
        time.sleep(sample_s)
        t1 = _cpu_times(cpus)
        busy = sum((t1[c][0] - t0[c][0]) / max(1, t1[c][1] - t0[c][1]) for c in t1 if c in t0)
        usable = min(usable, len(cpus) - busy)
    return _threads_for(usable, usable, processes)


def _threads_for(idle_cpus: float, usable: float, processes: Optional[int]) -> int:
    procs = processes or int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, int(min(usable, idle_cpus) / max(1, procs) + 0.5))


class AutoThreads:
    """``train.num_threads=0`` during training: every ``interval_s`` seconds, the CPU time other
    programs took on this process's CPUs since the last check (all CPUs' busy time from
    /proc/stat minus this process's own, ``time.process_time``) decides the thread count anew, as
    :func:`auto_num_threads` does at the start; so a program that starts (or ends) in the middle of
    a run changes the threads within ``interval_s``. ``maybe_update()`` is cheap (no sampling sleep)."""

    def __init__(self, interval_s: float, processes: Optional[int] = None) -> None:
        self.interval_s, self.processes = interval_s, processes
        self.cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
        limit = _cgroup_cpu_limit()
        self.usable = float(len(self.cpus)) if limit is None else min(float(len(self.cpus)), limit)
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._mark()

    def _mark(self) -> None:
        self.t, self.times, self.own = time.monotonic(), _cpu_times(self.cpus), time.process_time()

    def others_busy(self) -> Optional[float]:
        """CPUs' worth of other programs' use since the last mark (None without /proc/stat)."""
        wall = time.monotonic() - self.t
        t1 = _cpu_times(self.cpus)
        if not t1 or not self.times or wall <= 0:
            return None
        busy = sum(t1[c][0] - self.times[c][0] for c in t1 if c in self.times) / self.tick
        return max(0.0, (busy - (time.process_time() - self.own)) / wall)

    def maybe_update(self) -> Optional[int]:
        """Re-choose the threads when ``interval_s`` has passed; returns the new count if it changed."""
        if self.interval_s <= 0 or time.monotonic() - self.t < self.interval_s:
            return None
        others = self.others_busy()
        self._mark()
        if others is None:
            return None
        n = _threads_for(len(self.cpus) - others, self.usable, self.processes)
        if n == torch.get_num_threads():
            return None
        log.info("train.num_threads=0: %d CPU thread(s) now (other programs used %.1f CPUs)", n, others)
        torch.set_num_threads(n)
        return n


def apply_num_threads(num_threads: int, device: torch.device) -> int:
    """``train.num_threads``: > 0 sets it; 0 on a CPU device chooses :func:`auto_num_threads`
    unless ``OMP_NUM_THREADS`` is set (then torch's choice stands). Returns the threads in use."""
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    elif device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        n = auto_num_threads()
        if n != torch.get_num_threads():
            log.info("train.num_threads=0: %d CPU thread(s) (idle CPUs of this process; torch's default was %d)",
                     n, torch.get_num_threads())
            torch.set_num_threads(n)
    return torch.get_num_threads()
