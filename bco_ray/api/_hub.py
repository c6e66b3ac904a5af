"""`BCOTrainer.push_to_hub`: the run's model directory to the Hugging Face Hub, with transformers Trainer's
settings (`hub_model_id`, `hub_token`, `hub_private_repo`, `hub_revision`) mapped onto bco-ray's push."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from bco_ray.config.schema import Config
from bco_ray.remote import local_model_dir
from bco_ray.tracking.hub import HubError, push_model


def push(args, cfg: Config, model_dir: str, commit_message: str, token: str | None, revision: str | None) -> dict:
    """Create the repo (private when `hub_private_repo`, as the Hub's default otherwise: public) and upload
    `model_dir` (weights or LoRA adapter, tokenizer, model card) as one commit. Repo: `hub_model_id`, else the
    name of `output_dir` (as Trainer). Token: `token`, `hub_token`, else `$HF_TOKEN`."""
    repo_id = args.hub_model_id or Path(args.output_dir).name
    token = token or args.hub_token or os.environ.get("HF_TOKEN")
    if not token:
        raise HubError(
            f"push_to_hub() to {repo_id!r} needs a Hugging Face write token: set HF_TOKEN in the environment "
            "(or pass token=..., or hub_token)"
        )
    hub = dataclasses.replace(
        cfg.hub, repo_id=repo_id, private=bool(args.hub_private_repo), revision=revision or args.hub_revision
    )
    return push_model(local_model_dir(model_dir), dataclasses.replace(cfg, hub=hub), commit_message, token=token)
