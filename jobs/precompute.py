"""Run only the Ray Data pass: tokenize → reference log-probs → UDM weights, into the precompute cache
(the same as `bco-ray precompute`).

    python jobs/precompute.py --config configs/X.yaml [--precompute.force]

A later `jobs/bco.py` with the same model, data and pass settings reuses the cache instead of recomputing.
"""

from __future__ import annotations

from bco_ray.cli import exit_process, precompute


def main(argv: list[str] | None = None) -> int:
    return precompute(argv, prog="python jobs/precompute.py")


if __name__ == "__main__":
    exit_process(main())
