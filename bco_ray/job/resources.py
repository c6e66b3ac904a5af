"""What the cluster can give the job (the pass's stage sizes: bco_ray/precompute/sizing.py).

A job must finish on any cluster that has what it needs (a 1- or 2-CPU laptop included) and fail fast,
naming what is missing, on one that never will. Two rules keep the stages from starving each other:
  * the precompute pass runs before training starts and its actor pools are gone when it ends, so the two
    never hold resources at the same time;
  * inside the pass, the scoring actors never take every CPU: the light tasks (read, write, weights,
    statistics) keep a share, and on a small cluster every ask is scaled down to fit (a logical CPU share,
    not extra logical CPUs: Ray's CPU count stays what the machine has).
"""

from __future__ import annotations

import math
import os


def usable_cpus() -> int:
    """CPUs this process may actually use: its affinity mask, capped by a cgroup (v2 or v1) CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def _cgroup_quota() -> float | None:
    try:  # cgroup v2: "max 100000" or "200000 100000"
        with open("/sys/fs/cgroup/cpu.max") as f:
            q, p = f.read().split()[:2]
        return None if q == "max" else int(q) / int(p)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            q = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            p = int(f.read())
        return None if q <= 0 else q / p
    except (OSError, ValueError):
        return None
