"""Loading models and tokenizers: one from_pretrained path for hub ids, local dirs, the builtin tiny model and
directories on object storage (s3://..., copied once per node by bco_ray/remote.py)."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from bco_ray.config.schema import Config, TrainConfig
from bco_ray.errors import InputError
from bco_ray.remote import local_model_dir

log = logging.getLogger(__name__)


@dataclass
class Paths:
    """The job's resolved model locations (builtin names already materialised, checked by the driver before any
    Ray work: bco_ray/job/checks.py) and the tokenizer's pad id: what the pass, the workers and the eval load."""

    policy: str
    reference: str
    tokenizer: str
    embedder: str | None
    pad_id: int


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_dtype(name: str, on_gpu: bool) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    return DTYPES[name]


def use_bf16(t: TrainConfig, on_gpu: bool) -> bool:
    """`train.bf16`: "auto" is bf16 on GPU and float32 on CPU; True/False force it. The text "true"/"false"
    (the field's spelling before it was typed, in a TrainConfig built in code) counts as the boolean."""
    value = t.bf16
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return on_gpu
        return value.strip().lower() in ("true", "yes", "1")
    return bool(value)


def reference_dtype(cfg: Config) -> str:
    """The reference scores in the policy's training dtype unless model.dtype says otherwise, so that a
    reference equal to the policy's initial weights gives step-0 rewards of exactly 0 (GPU bf16 included)."""
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    on_gpu = cfg.train.use_gpu and cfg.precompute.num_gpus_per_actor > 0
    return "bfloat16" if use_bf16(cfg.train, on_gpu) else "float32"


def load_tokenizer(path: str, revision: str | None = None, trust_remote_code: bool = False):
    tok = AutoTokenizer.from_pretrained(
        local_model_dir(path, weights=False), revision=revision, trust_remote_code=trust_remote_code
    )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
        log.warning("tokenizer %s has no pad token; using %r for padding", path, tok.pad_token)
    return tok


AUTO_ATTN = "auto"


class ModelLoadError(InputError, ValueError):
    """A model that cannot be built with the given settings: one message naming the model and the fix."""


def attn_kwargs(attn_implementation: str | None) -> dict:
    """from_pretrained/from_config keyword for `model.attn_implementation`: none for "auto" (or None), so
    transformers picks what the model supports (sdpa where it can, else eager); the name otherwise."""
    if attn_implementation in (None, "", AUTO_ATTN):
        return {}
    return {"attn_implementation": attn_implementation}


def load_causal_lm(
    path: str,
    *,
    dtype: torch.dtype,
    revision: str | None = None,
    attn_implementation: str | None = AUTO_ATTN,
    trust_remote_code: bool = False,
):
    return AutoModelForCausalLM.from_pretrained(
        local_model_dir(path),
        revision=revision,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        **attn_kwargs(attn_implementation),
    )


def _build_error(config, attn_implementation: str | None, trust_remote_code: bool) -> Exception | None:
    """Build the causal LM from its config on the meta device (no weights, no memory); the error, if any."""
    try:
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(
                copy.deepcopy(config), trust_remote_code=trust_remote_code, **attn_kwargs(attn_implementation)
            )
    except Exception as e:  # noqa: BLE001 - any failure to build is reported, with its cause
        return e
    return None


def _first_sentence(e: Exception) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text.split(". ")[0].rstrip(".")[:300]


def check_model_loads(
    path: str, revision: str | None = None, trust_remote_code: bool = False, attn_implementation: str | None = AUTO_ATTN
) -> None:
    """Cheaply check that `path` builds as a causal LM with this attention setting, before any Ray work:
    the config is read and the model built on the meta device (no weights loaded). Raises ModelLoadError."""
    try:
        config = AutoConfig.from_pretrained(
            local_model_dir(path, weights=False), revision=revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:  # a remote directory that is missing: FileNotFoundError
        raise ModelLoadError(f"{path!r}: cannot read its config ({_first_sentence(e)})") from e
    err = _build_error(config, attn_implementation, trust_remote_code)
    if err is None:
        return
    if attn_kwargs(attn_implementation) and _build_error(config, AUTO_ATTN, trust_remote_code) is None:
        raise ModelLoadError(
            f"{path!r} cannot run with model.attn_implementation={attn_implementation!r} "
            f"({_first_sentence(err)}); set model.attn_implementation=auto (the default: transformers picks "
            f"what the model supports) or another implementation it supports, e.g. eager"
        ) from err
    raise ModelLoadError(
        f"{path!r} cannot be built as a causal language model ({_first_sentence(err)}); "
        "give a decoder-only model with a causal LM head"
    ) from err


def load_embedder(path: str, dtype: torch.dtype):
    local = local_model_dir(path)
    tok = AutoTokenizer.from_pretrained(local)
    model = AutoModel.from_pretrained(local, dtype=dtype)
    return tok, model


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens, L2-normalised (sentence-transformers' MiniLM recipe)."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled.float(), p=2, dim=-1)
