"""How many CPU threads inference should use: the CPUs this process may really run on.

torch sizes its thread pool from the CPUs it can see. In a container with a CPU quota (a Hugging Face Space, a
Kubernetes pod, `docker run --cpus 2`) that is the host's core count, and 32 threads sharing 2 CPUs of quota
are several times slower than 2. The quota is in the cgroup files: `cpu.max` (cgroup v2) or
`cpu.cfs_quota_us` / `cpu.cfs_period_us` (cgroup v1).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cpu_quota(cgroup_root: str | os.PathLike = CGROUP_ROOT) -> float | None:
    """CPUs' worth of time per period this cgroup may use (e.g. 2.0), or None when there is no quota."""
    root = Path(cgroup_root)
    try:  # cgroup v2: "<quota> <period>" or "max <period>"
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for folder in (root / "cpu", root / "cpu,cpuacct"):  # cgroup v1: quota -1 means none
        try:
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota <= 0 or period <= 0 else quota / period
    return None


def available_cpus(cgroup_root: str | os.PathLike = CGROUP_ROOT) -> int:
    """CPUs this process can use: its CPU affinity, capped by the cgroup quota (rounded up), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = cpu_quota(cgroup_root)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def set_inference_threads(threads: int | None = None) -> int:
    """torch's intra-op threads = `threads`, or `available_cpus()` when None; returns the number set."""
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    count = threads if threads is not None else available_cpus()
    torch.set_num_threads(count)
    return count
