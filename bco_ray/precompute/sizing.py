"""How the precompute pass sizes its stages to the cluster (the job passes the result to the pass).

Inside the pass, the scoring actors never take every CPU: the light tasks (read, write, weights, statistics)
keep a share, and on a small cluster every ask is scaled down to fit (a logical CPU share, not extra logical
CPUs: Ray's CPU count stays what the machine has). The pass runs before training starts and its actor pools
are gone when it ends, so the pass and the workers never hold resources at the same time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


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
