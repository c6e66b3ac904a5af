"""Compare the runs of an MLflow experiment: the params that differ between them, the final and best value of
a metric, and one PNG overlaying that metric's curves (e.g. a β sweep).

    python jobs/compare.py --experiment bco-ray-tiny                       # metric eval/auc
    python jobs/compare.py --experiment sweep --metric loss --out reports/
    python jobs/compare.py --experiment sweep --metric eval/gen/score    # the generation eval's verifier score
    python jobs/compare.py --experiment sweep --filter "attributes.status = 'FINISHED'"

Prints the table and writes compare_<experiment>_<metric>.{csv,md,png} under --out.
The tracking server: --tracking-uri, else $MLFLOW_TRACKING_URI, else ./mlflow.db (the jobs' default).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True, help="MLflow experiment name")
    parser.add_argument("--metric", default="eval/auc", help="metric to compare (default: eval/auc)")
    parser.add_argument("--mode", choices=("auto", "max", "min"), default="auto",
                        help="which value is best; auto: min for loss-like names, else max")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI")
    parser.add_argument("--out", default="outputs/compare", help="directory for the CSV, Markdown and PNG")
    parser.add_argument("--filter", default="", help="MLflow search filter, e.g. \"params.`udm.enabled` = 'True'\"")
    parser.add_argument("--extra", default="loss,rewards/margins,eval/auc,eval/gen/score,eval/gen/score_ref",
                        help="comma-separated metrics shown with their final value")
    parser.add_argument("--all-params", action="store_true",
                        help="also list params that only say where things are written (output_dir, cache_dir, "
                             "the tracking URI, ...) when they differ")
    parser.add_argument("--smooth", action=argparse.BooleanOptionalAction, default=None,
                        help="EMA-smooth the curves (default: when a curve has > 50 points)")
    args = parser.parse_args(argv)

    from mlflow.tracking import MlflowClient

    from bco_ray.tracking.compare import IGNORED_PARAMS, CompareError, compare_runs, format_table, write_outputs
    from bco_ray.tracking.mlflow_run import normalize_uri

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    uri = normalize_uri(uri) if uri else f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
    try:
        comp = compare_runs(MlflowClient(uri), args.experiment, args.metric, args.mode, args.filter,
                            tuple(m for m in args.extra.split(",") if m),
                            ("mlflow.run_name",) if args.all_params else IGNORED_PARAMS)
    except CompareError as e:
        print(f"compare: {e} (tracking URI {uri})", file=sys.stderr)
        return 2
    print(format_table(comp))
    paths = write_outputs(comp, args.out, args.smooth)
    print("\n" + "\n".join(f"{k:>8}: {v}" for k, v in paths.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
