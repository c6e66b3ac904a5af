"""Where DeepSpeed builds its just-in-time ops, and which it need not build. Standard library only at import: the
tests' conftest calls `pin_jit_builds` at start-up."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path


def pin_jit_builds() -> None:
    """DeepSpeed JIT-builds its CPU ops (the gloo comm op, CPU Adam) under TORCH_EXTENSIONS_DIR with the first `ninja`
    on PATH. Two Python environments, or one venv's ninja and the system's, read each other's build as stale and
    rebuild it (~20 s on 2 cores) each time they alternate. So, unless the user set it, each environment builds in
    its own directory, with the ninja installed next to this interpreter when there is one."""
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        tag = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path.home() / ".cache" / "torch_extensions" / f"bco-ray-{tag}")
    bin_dir, path = os.path.dirname(sys.executable), os.environ.get("PATH", "")
    if os.path.exists(os.path.join(bin_dir, "ninja")) and not path.startswith(bin_dir + os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + path


def init_distributed(backend: str, **kwargs) -> None:
    """`deepspeed.init_distributed` with the JIT builds pinned (above) and without the one op a training engine never
    uses: on a CPU accelerator, DeepSpeed's first init JIT-builds a shared-memory all-reduce (`deepspeed_shm_comm`,
    about 40 s of compiling on 2 cores, once per environment and node) that only its inference all-reduce calls; a
    training engine's collectives go through torch.distributed (gloo). It is marked unavailable, as DeepSpeed marks
    it where the platform lacks it, and so not built. On a GPU accelerator the op does not exist: nothing changes."""
    import deepspeed
    import deepspeed.ops

    pin_jit_builds()
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend, **kwargs)
