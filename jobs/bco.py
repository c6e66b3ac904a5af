"""Run a BCO job: Ray Data precompute → Ray Train + DeepSpeed → MLflow (the same as `bco-ray train`).

    python jobs/bco.py                                   # embedded defaults (configs/tiny.yaml)
    python jobs/bco.py --config configs/X.yaml --train.lr=1e-6
    python jobs/bco.py --help                            # every config field, its default and what it does
    ray job submit --working-dir . -- python jobs/bco.py --config configs/X.yaml

Connects to the Ray cluster it runs in (or one started with `ray start` here), else starts a local Ray.
"""

from __future__ import annotations

from bco_ray.cli import exit_process, train


def main(argv: list[str] | None = None) -> int:
    return train(argv, prog="python jobs/bco.py")


if __name__ == "__main__":
    exit_process(main())
