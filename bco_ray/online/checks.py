"""The online section's checks that need no cluster: the prompt source gives prompts and the labeler labels one of
them, before any Ray work (bco_ray/config/checks.py has already checked the values' ranges and forms)."""

from __future__ import annotations

from collections.abc import Callable

from bco_ray.config.schema import Config
from bco_ray.online.labeler import Labeler
from bco_ray.online.prompts import PromptSource


def check_online(cfg: Config, labeler: Callable | None = None) -> tuple[PromptSource, Labeler]:
    """The run's prompt source (seeded by data.seed) and labeler, each tried once: round 0's first prompt is
    read, and labelled with an empty completion. Raises PromptsError / LabelerError naming the field.
    `labeler`: a function `(prompt, completion) -> verdict` given in-process (it labels on this driver), used
    instead of importing online.labeler."""
    o = cfg.online
    source = PromptSource.from_spec(o.prompts, cfg.data.seed, cfg.data.on_bad_rows)
    probe = source.round(0, 1)[0]
    if labeler is not None:
        name = getattr(labeler, "__name__", type(labeler).__name__)
        return source, Labeler.checked(labeler, name, probe, o.threshold, o.on_label_error, field="labeler")
    return source, Labeler.load(o.labeler, probe, o.threshold, o.on_label_error)
