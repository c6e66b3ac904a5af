"""Run only the Ray Data pass: tokenize → reference log-probs → UDM weights, into the precompute cache.

    python jobs/precompute.py --config configs/X.yaml [--precompute.force]

A later `jobs/bco.py` with the same model, data and pass settings reuses the cache instead of recomputing.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bco_ray.config import ConfigError, config_from_cli  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_cli(argv, __doc__, DEFAULT_CONFIG)
    except ConfigError as e:
        print(f"bco-ray: config error: {e}", file=sys.stderr)
        return 2
    from bco_ray.data.checks import DataError, check_data
    from bco_ray.data.formats import DataFormatError
    from bco_ray.precompute.pipeline import run_precompute
    from bco_ray.preflight import SharedStorageError, check_shared_paths
    from bco_ray.run import ModelError, init_ray, resolve_paths
    from bco_ray.storage import resolve_locations
    from bco_ray.tracking.mlflow_run import tracking_uri
    cfg = resolve_locations(cfg)
    try:
        report = check_data(cfg)
        paths, _ = resolve_paths(cfg)
    except (DataError, DataFormatError, ModelError, FileNotFoundError) as e:
        print(f"bco-ray: input error: {e}", file=sys.stderr)
        return 2
    init_ray(cfg)
    try:
        check_shared_paths(cfg, paths, tracking_uri(cfg))
    except SharedStorageError as e:
        print(f"bco-ray: storage error: {e}", file=sys.stderr)
        return 2
    labels = report["train"]["labels"]
    pre = run_precompute(cfg, paths, {True: labels["true"], False: labels["false"]})
    print(f"[bco-ray] precompute {'reused (cache hit)' if pre.reused else 'computed'}: {pre.dir}")
    print(json.dumps(pre.summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
