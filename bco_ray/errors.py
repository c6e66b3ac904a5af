"""One base class for the errors bco-ray reports to a user: a bad setting or input, a cluster that cannot provide
what a job asks for, storage that is not shared. Each kind has an exit code (the command line's `bco-ray: <kind>
error: <message>` and status); anything else is a bug and ends with a traceback (exit status 1).

    kind        exit  raised for
    config      2     a bad config value or override (ConfigError)
    input       2     data, models, tokenizer, verifier, embedding function, hub settings, runs to compare
    resources   3     the cluster cannot give the pass or the worker group what they ask for
    storage     4     a path the job writes is not visible from every node
    training    5     training diverged (a non-finite loss, gradient norm or weight)
"""

from __future__ import annotations

# kind -> the command line's exit status for an error of that kind
EXIT_CODES = {"config": 2, "input": 2, "resources": 3, "storage": 4, "training": 5}


class BcoRayError(Exception):
    """An error whose message names the setting or input at fault and the fix; `kind` labels it in the
    command line's message and `exit_code` is the command's exit status. A subclass names its kind in its
    bases (`class InputError(BcoRayError, kind="input")`) and gets that kind's exit status from `EXIT_CODES`."""

    kind: str = "input"
    exit_code: int = EXIT_CODES["input"]

    def __init_subclass__(cls, kind: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if kind is not None:
            cls.kind, cls.exit_code = kind, EXIT_CODES[kind]


class InputError(BcoRayError, kind="input"):
    """Data, models and other inputs that cannot work (exit status 2)."""


class ConfigErrorBase(BcoRayError, kind="config"):
    """A bad config value (exit status 2)."""


class ResourcesError(BcoRayError, kind="resources"):
    """The cluster does not provide what the job asks for (exit status 3)."""


class StorageError(BcoRayError, kind="storage"):
    """Storage the job needs is not shared by every node (exit status 4)."""


class TrainingError(BcoRayError, kind="training"):
    """Training itself failed in a way the settings explain, e.g. it diverged (exit status 5)."""
