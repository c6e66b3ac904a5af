"""Optional push of the final model directory (weights, tokenizer, model card) to the Hugging Face Hub
(`hub.repo_id`). The token comes from the environment (`HF_TOKEN`, e.g. a Ray job's runtime env set at submit
time or a cluster secret), never from a file in the repository. `HF_ENDPOINT` points at another hub."""

from __future__ import annotations

import os

from huggingface_hub import HfApi

from bco_ray.config.schema import Config
from bco_ray.errors import InputError


class HubError(InputError, ValueError):
    """hub.* settings that cannot work: the message names the setting and the fix."""


def check_push_ready(cfg: Config) -> None:
    """Before any work: a push needs a token in the environment."""
    if cfg.hub.repo_id and not os.environ.get("HF_TOKEN"):
        raise HubError(
            f"hub.repo_id={cfg.hub.repo_id!r} pushes the model to the Hugging Face Hub, which needs a "
            "write token in the environment variable HF_TOKEN (set it in the job's environment at "
            "submit time, never in a committed file), or leave hub.repo_id unset"
        )


def push_model(model_dir: str, cfg: Config, commit_message: str, token: str | None = None) -> dict:
    """Create the repo if needed (`hub.private`), then upload `model_dir` as one commit to `hub.revision`
    (default branch when None). Returns {"hub.repo_id", "hub.commit", "hub.url"} for the run's tags. `token`:
    the Python API's explicit token; None: $HF_TOKEN."""
    h = cfg.hub
    if token is None:
        check_push_ready(cfg)
    api = HfApi(token=token or os.environ["HF_TOKEN"])
    repo = api.create_repo(h.repo_id, private=h.private, exist_ok=True, repo_type="model")
    if h.revision:
        api.create_branch(h.repo_id, branch=h.revision, exist_ok=True, repo_type="model")
    info = api.upload_folder(
        repo_id=h.repo_id,
        folder_path=model_dir,
        revision=h.revision,
        repo_type="model",
        commit_message=commit_message[:200],
    )
    return {
        "hub.repo_id": h.repo_id,
        "hub.commit": info.oid,
        "hub.url": str(getattr(repo, "url", "") or info.commit_url),
    }
