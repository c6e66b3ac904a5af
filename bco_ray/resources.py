"""What the cluster can give the job, and how the job sizes its Ray Data stages and Ray Train workers to it.

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
from dataclasses import dataclass


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


@dataclass(frozen=True)
class PassResources:
    """Logical CPU asks of the pass's stages on this cluster."""

    actor_cpus: float  # each scoring actor (tokenize, reference log-probs, embeddings)
    task_cpus: float  # each light task (read, write, shuffle + weights, statistics)
    max_actors: int  # upper bound of the scoring pool
    actor_threads: int  # torch threads of a scoring actor (the pass's only heavy compute)


def pass_resources(cluster_cpus: float, wanted_actors: int, can_grow: bool) -> PassResources:
    """Sizes for a cluster with `cluster_cpus` CPUs now (`can_grow`: an autoscaler may add nodes).

    One pool of scoring actors runs, fed and drained by light tasks. On a cluster that can grow, or has
    room, each actor asks for a whole CPU and one CPU stays free for the light tasks. On a small fixed
    cluster (fewer than 3 CPUs: a laptop, a small head node) one actor asks for half of it and each light
    task for a sixth, so that everything fits at once and no stage waits for another to let go; the actor
    then runs torch on every CPU, since nothing else heavy runs during the pass."""
    if can_grow or cluster_cpus >= 3:
        free = max(int(cluster_cpus) - 1, 1)
        return PassResources(
            actor_cpus=1.0, task_cpus=0.25, max_actors=max(1, min(wanted_actors, free)), actor_threads=1
        )
    c = cluster_cpus if cluster_cpus > 0 else 1.0
    return PassResources(
        actor_cpus=math.floor(c * 500) / 1000,
        task_cpus=math.floor(c * 1000 / 6) / 1000,
        max_actors=1,
        actor_threads=max(1, int(c)),
    )
