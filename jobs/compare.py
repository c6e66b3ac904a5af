"""Compare the runs of an MLflow experiment (the same as `bco-ray compare`; `--help` says how).

python jobs/compare.py --experiment sweep --metric eval/auc --out reports/
"""

from __future__ import annotations

import sys

from bco_ray.cli import compare


def main(argv: list[str] | None = None) -> int:
    return compare(argv, prog="python jobs/compare.py")


if __name__ == "__main__":
    sys.exit(main())
