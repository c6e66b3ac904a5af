"""bco-ray: BCO (Binary Classifier Optimization) on Ray Data, Ray Train + DeepSpeed and MLflow.

`from bco_ray import BCOConfig, BCOTrainer` is the drop-in API for users of TRL's BCOTrainer (bco_ray/api/), and
`from bco_ray import OnlineBCOConfig, OnlineBCOTrainer` its online counterpart;
it is imported on first use, so that `import bco_ray.<module>` in Ray workers stays light.
"""

from __future__ import annotations

__version__ = "0.1.0"
_API = ("BCOConfig", "BCOTrainer", "BCOTrainOutput", "BCOConfigWarning", "OnlineBCOConfig", "OnlineBCOTrainer")
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name in _API:
        from bco_ray import api

        return getattr(api, name)
    raise AttributeError(f"module 'bco_ray' has no attribute {name!r}")
