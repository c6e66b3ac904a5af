"""The BCO math: plain torch / scikit-learn, no Ray. Unit-tested against hand-computed numbers."""

from bco_ray.bco.logprobs import completion_logps, policy_completion_logps
from bco_ray.bco.loss import RunningMean, bco_losses
from bco_ray.bco.udm import fit_udm_classifier, udm_weights

__all__ = [
    "completion_logps",
    "policy_completion_logps",
    "RunningMean",
    "bco_losses",
    "fit_udm_classifier",
    "udm_weights",
]
