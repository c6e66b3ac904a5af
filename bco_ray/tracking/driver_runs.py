"""Which process owns an MLflow run. Each job tags its run with its driver (host, pid, process start time), so a
later job can tell a run whose driver died without closing it (SIGKILL, a crashed machine: it would stay RUNNING
for ever) from one that is still being written to, by a driver on this host that is alive."""

from __future__ import annotations

import logging
import os
import socket

import psutil
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

ERROR_TAG = "error"
ERROR_TYPE_TAG = "error_type"
DRIVER_TAG = "bco_ray.driver"  # host:pid of the job's driver
DRIVER_STARTED_TAG = "bco_ray.driver_started"  # its start time (s since the epoch): a reused pid is another process
DRIVER_PID_NS_TAG = "bco_ray.driver_pid_ns"  # its pid namespace: a container with this hostname sees other pids
LOST = "DriverLost"


def _pid_ns() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:  # not Linux
        return ""


def driver_tags() -> dict[str, str]:
    """This process, as the tags of the run it drives."""
    started = psutil.Process().create_time()
    return {
        DRIVER_TAG: f"{socket.gethostname()}:{os.getpid()}",
        DRIVER_STARTED_TAG: f"{started:.2f}",
        DRIVER_PID_NS_TAG: _pid_ns(),
    }


def driver_state(tags: dict) -> str:
    """'alive', 'dead', or 'unknown' (no driver tag, or a driver on another host) for a run's tags. This process
    counts as dead: a job opens its run before it starts, so a run it left RUNNING is not being written to."""
    host, _, pid = tags.get(DRIVER_TAG, "").rpartition(":")
    if not host or host != socket.gethostname() or not pid.isdigit():
        return "unknown"
    if tags.get(DRIVER_PID_NS_TAG, _pid_ns()) != _pid_ns():  # its pids are not the ones seen here
        return "unknown"
    if int(pid) == os.getpid():
        return "dead"
    try:
        started = psutil.Process(int(pid)).create_time()
    except psutil.NoSuchProcess:
        return "dead"
    except psutil.Error:  # exists, not ours to inspect
        return "alive"
    try:
        recorded = float(tags.get(DRIVER_STARTED_TAG, ""))
    except ValueError:
        return "alive"
    return "alive" if abs(started - recorded) < 1.0 else "dead"


def close_stale_runs(client: MlflowClient, experiment_id: str, output_dir: str) -> list[str]:
    """Mark KILLED the RUNNING runs of this experiment and output directory whose driver, on this host, is gone.
    Returns their run ids. Runs of drivers on other hosts are left as they are: their state cannot be seen here."""
    stale = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        if run.data.params.get("output_dir") != output_dir or driver_state(run.data.tags) != "dead":
            continue
        driver = run.data.tags[DRIVER_TAG]
        client.set_tag(run.info.run_id, ERROR_TAG, f"{LOST}: the job's driver ({driver}) ended without closing the run")
        client.set_tag(run.info.run_id, ERROR_TYPE_TAG, LOST)
        client.set_terminated(run.info.run_id, "KILLED")
        log.warning("MLflow run %s was RUNNING but its driver %s is gone: marked KILLED", run.info.run_id, driver)
        stale.append(run.info.run_id)
    return stale
