"""The UDM `embedding_func` as TRL users write it (`functools.partial(embed_prompt, model=embedding_model)`, the
model an `AutoModel` in bf16, maybe on a GPU, maybe `accelerator.prepare_model`-ed), pickled for the Ray actors
that run it. What cannot reach them fails here, before any Ray work, saying what to change.

- tensors on a GPU are pickled as CPU tensors and placed on the actor's GPU, or its CPU when it has none
  (`bco_ray.precompute.embedding_func.on_actor_device`);
- a model `prepare_model` wrapped for mixed precision (accelerate's fp32-output `forward`, which accelerate
  refuses to pickle) is pickled with its own `forward`; a DDP / DataParallel wrapper as the model inside it;
- a model dispatched over several devices by `device_map` (accelerate hooks), or with weights on the meta
  device (offloaded), is an error: load the embedding model on one device.
"""

from __future__ import annotations

import functools
import io
from typing import Any

import torch

from bco_ray.errors import InputError
from bco_ray.precompute.embedding_func import as_is, on_actor_device

FIX = (
    "define the function at module level, taking the model as an argument, and pass "
    "functools.partial(embed_prompt, model=embedding_model), with the embedding model loaded on one device"
)


class EmbeddingFuncPicklingError(InputError, TypeError):
    """BCOTrainer(embedding_func=...) cannot be sent to the Ray actors: the message says what to change."""


def modules_in(func: Any, depth: int = 0) -> list[torch.nn.Module]:
    """The torch modules a callable holds: a partial's arguments, a bound method's object, closure cells."""
    if isinstance(func, torch.nn.Module):
        return [func]
    if depth > 3:
        return []
    found: list[torch.nn.Module] = []
    if isinstance(func, functools.partial):
        for x in (func.func, *func.args, *func.keywords.values()):
            found += modules_in(x, depth + 1)
    for attr in ("__self__",):
        if hasattr(func, attr):
            found += modules_in(getattr(func, attr), depth + 1)
    for cell in getattr(func, "__closure__", None) or ():
        try:
            found += modules_in(cell.cell_contents, depth + 1)
        except ValueError:  # an empty cell
            pass
    return found


def check_modules(func: Any) -> None:
    """Models that cannot be rebuilt on an actor: spread over devices by accelerate hooks, or offloaded."""
    for model in modules_in(func):
        devices = {str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}
        if len(devices) > 1 or devices & {"disk", "meta"}:
            raise EmbeddingFuncPicklingError(
                f"embedding_func's model is spread over {sorted(devices)} by device_map: the Ray actors that "
                "embed the prompts load it whole. Load it on one device (device_map=None, or {'': 0}), e.g. "
                "AutoModel.from_pretrained(..., dtype=torch.bfloat16).to('cuda')"
            )
        for name, t in (*model.named_parameters(), *model.named_buffers()):
            if t.device.type == "meta":
                raise EmbeddingFuncPicklingError(
                    f"embedding_func's model has weights on the meta device ({name}): load it fully on one device"
                )


def dumps(obj: Any, cloudpickle: Any) -> bytes:
    """cloudpickle `obj` with GPU tensors as CPU ones (placed on the actor's device when loaded) and accelerate's
    mixed-precision `forward` wrappers left out."""

    class Pickler(cloudpickle.CloudPickler):
        def reducer_override(self, o):
            if isinstance(o, torch.Tensor) and o.device.type not in ("cpu", "meta"):
                return on_actor_device, (o.detach().cpu(), isinstance(o, torch.nn.Parameter), o.requires_grad)
            if isinstance(o, torch.nn.Module):
                if isinstance(o, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
                    return as_is, (o.module,)
                if "_original_forward" in o.__dict__:  # accelerate's prepare_model(..., mixed precision)
                    state = {k: v for k, v in o.__dict__.items() if k not in ("forward", "_original_forward")}
                    return object.__new__, (type(o),), state
            return super().reducer_override(o)

    buf = io.BytesIO()
    try:
        Pickler(buf).dump(obj)
    except Exception as e:  # noqa: BLE001 - any pickling failure gets the same fix
        raise EmbeddingFuncPicklingError(
            f"embedding_func cannot be sent to the Ray actors that embed the prompts "
            f"({type(e).__name__}: {str(e)[:300]}): {FIX}"
        ) from e
    return buf.getvalue()
