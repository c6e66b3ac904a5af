"""Run a BCO job: Ray Data precompute → Ray Train + DeepSpeed → MLflow.

    python jobs/bco.py                                   # embedded defaults (configs/tiny.yaml)
    python jobs/bco.py --config configs/X.yaml --train.lr=1e-6
    ray job submit --working-dir . -- python jobs/bco.py --config configs/X.yaml

Connects to the Ray cluster it runs in (or one started with `ray start` here), else starts a local Ray.
"""
from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bco_ray.config import ConfigError, config_from_cli  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_cli(argv, __doc__, DEFAULT_CONFIG)
    except ConfigError as e:
        print(f"bco-ray: config error: {e}", file=sys.stderr)
        return 2
    from bco_ray.data.checks import DataError
    from bco_ray.data.formats import DataFormatError
    from bco_ray.preflight import SharedStorageError
    from bco_ray.run import ModelError, ResourcesUnavailableError, run_job
    # `ray job stop` and schedulers send SIGTERM: end like Ctrl-C, so the MLflow run is marked KILLED
    # (checkpoints and the precompute cache are committed atomically, so nothing half-written is trusted).
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        run_job(cfg)
    except (DataError, DataFormatError, ModelError, FileNotFoundError) as e:
        print(f"bco-ray: input error: {e}", file=sys.stderr)
        return 2
    except SharedStorageError as e:
        print(f"bco-ray: storage error: {e}", file=sys.stderr)
        return 2
    except ResourcesUnavailableError as e:
        print(f"bco-ray: resources error: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
