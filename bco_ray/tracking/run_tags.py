"""Tags saying what ran and where: the git commit (taken at submit time where possible), the Ray job, its
submission id and dashboard, and the library versions."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import mlflow


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parents[2]
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _job_metadata() -> dict:
    """The metadata of the Ray job this driver runs as (`ray job submit --metadata-json`, plus Ray's own
    `job_submission_id`), from the job config Ray's job supervisor hands the entrypoint; {} outside a job."""
    try:
        return dict(json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("metadata") or {})
    except (ValueError, AttributeError):
        return {}


def git_commit() -> tuple[str | None, str | None]:
    """(commit, where it came from). Taken at submit time first, since a `ray job submit` working dir has no
    .git and a node's own checkout may be at another commit: `$BCO_RAY_GIT_COMMIT` (e.g.
    `ray job submit ... -- BCO_RAY_GIT_COMMIT=$(git rev-parse HEAD) python jobs/bco.py ...`), or the job's
    metadata key `git_commit` (`--metadata-json`); else HEAD of the checkout this code runs from."""
    for source, value in (
        ("env", os.environ.get("BCO_RAY_GIT_COMMIT")),
        ("job_metadata", _job_metadata().get("git_commit")),
    ):
        if value:
            return value.strip(), source
    head = _git("rev-parse", "HEAD")
    return (head, "checkout") if head else (None, None)


def git_tags() -> dict:
    commit, source = git_commit()
    if not commit:
        return {}
    tags = {"git_commit": commit, "git_commit.source": source, "mlflow.source.git.commit": commit}
    if source == "checkout":
        status = _git("status", "--porcelain", "--untracked-files=no")
        tags["git_dirty"] = None if status is None else bool(status)
    return tags


def ray_tags() -> dict:
    """Where the job ran: Ray's job id, the `ray job submit` submission id, the dashboard URL."""
    import ray  # driver-side only: tracking/ is also imported by workers and tools without Ray

    if not ray.is_initialized():
        return {}
    tags = {
        "ray.job_id": ray.get_runtime_context().get_job_id(),
        "ray.submission_id": _job_metadata().get("job_submission_id") or os.environ.get("RAY_JOB_SUBMISSION_ID"),
    }
    try:  # what ray.init()'s RayContext.dashboard_url reports (no public getter once Ray is initialised)
        from ray._private.worker import get_dashboard_url

        url = get_dashboard_url()
    except Exception:  # noqa: BLE001 - a tag, never a failure
        url = None
    if url:
        tags["ray.dashboard_url"] = url if "://" in url else f"http://{url}"
    return tags


def version_tags() -> dict:
    import deepspeed  # heavy: imported once, when a run opens
    import ray
    import torch
    import transformers

    return {
        **git_tags(),
        "version.ray": ray.__version__,
        "version.deepspeed": deepspeed.__version__,
        "version.torch": torch.__version__,
        "version.transformers": transformers.__version__,
        "version.mlflow": mlflow.__version__,
    }
