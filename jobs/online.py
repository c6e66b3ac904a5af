"""Run an online BCO job: rounds of generate → label → score → update on Ray (the same as `bco-ray online`).

    python jobs/online.py                                # embedded defaults (configs/online.yaml)
    python jobs/online.py --config configs/X.yaml --online.rounds=50
    python jobs/online.py --help                         # every config field, its default and what it does
    ray job submit --working-dir . -- python jobs/online.py --config configs/X.yaml

Connects to the Ray cluster it runs in (or one started with `ray start` here), else starts a local Ray.
"""

from __future__ import annotations

from bco_ray.cli import exit_process, online


def main(argv: list[str] | None = None) -> int:
    return online(argv, prog="python jobs/online.py")


if __name__ == "__main__":
    exit_process(main())
