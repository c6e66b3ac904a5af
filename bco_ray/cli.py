"""The `bco-ray` command: `bco-ray train | online | precompute | compare`.

    bco-ray train                                        # embedded defaults (configs/tiny.yaml)
    bco-ray train --config configs/X.yaml --train.lr=1e-6
    bco-ray train --config configs/X.yaml --print-config # the resolved config, as YAML
    bco-ray train --config configs/X.yaml --dry-run      # every check, no Ray work
    bco-ray online                                       # online BCO, embedded defaults (configs/online.yaml)
    bco-ray precompute --config configs/X.yaml [--precompute.force]
    bco-ray compare --experiment sweep --metric eval/auc
    ray job submit --working-dir . -- python jobs/bco.py --config configs/X.yaml

`jobs/bco.py`, `jobs/online.py`, `jobs/precompute.py` and `jobs/compare.py` are the same commands as scripts, for
`ray job submit --working-dir .` (Ray puts the working directory on the driver's PYTHONPATH).
A `bco-ray: <kind> error: <message>` ends with the kind's exit status (bco_ray/errors.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import NoReturn

import yaml

from bco_ray import __version__
from bco_ray.config.doc import field_docs, show
from bco_ray.config.schema import Config, load_config
from bco_ray.console import console
from bco_ray.errors import BcoRayError
from bco_ray.job import signals

# Each command imports its stage (torch, Ray, MLflow: seconds) when it runs, so that `--help`, `--print-config`
# and a bad option answer at once.

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
ONLINE_CONFIG = DEFAULT_CONFIG.with_name("online.yaml")  # the online job's: 1 training worker beside the rollout
TRAIN_DOC = "Run a BCO job: Ray Data precompute → Ray Train + DeepSpeed → MLflow."
ONLINE_DOC = (
    "Run online BCO: rounds of the policy's own completions, labelled by online.labeler, scored by the "
    "reference and trained with BCO on a Ray Train worker group kept alive across rounds; MLflow."
)
PRECOMPUTE_DOC = (
    "Run only the Ray Data pass: tokenize → reference log-probs → UDM weights, into the precompute "
    "cache. A later train job with the same model, data and pass settings reuses it."
)
COMPARE_DOC = """Compare the runs of an MLflow experiment: the params that differ between them, the final and best
value of a metric, and one PNG overlaying that metric's curves (e.g. a beta sweep).

    bco-ray compare --experiment bco-ray-tiny                       # metric eval/auc
    bco-ray compare --experiment sweep --metric loss --out reports/
    bco-ray compare --experiment sweep --metric eval/gen/score      # the generation eval's verifier score
    bco-ray compare --experiment sweep --filter "attributes.status = 'FINISHED'"

Prints the table and writes compare_<experiment>_<metric>.{csv,md,png} under --out.
The tracking server: --tracking-uri, else $MLFLOW_TRACKING_URI, else ./mlflow.db (the jobs' default)."""


def _default_config(path: Path = DEFAULT_CONFIG) -> Path | None:
    """configs/tiny.yaml (or the command's own) of a source checkout; an installed package without it starts from
    the built-in defaults."""
    return path if path.exists() else None


# ---------------------------------------------------------------- the config commands' command line
def _config_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=doc,
        add_help=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage=f"{prog} [--config FILE] [--print-config] [--dry-run] [--section.key=VALUE ...]",
    )
    parser.add_argument("-h", "--help", action="store_true", help="show this help (every config field) and exit")
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help=f"YAML config (default: {DEFAULT_CONFIG.name} of the checkout, else the built-in defaults)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="run every check (config, data, models, hub settings) and exit before any Ray work",
    )
    return parser


def config_help(parser: argparse.ArgumentParser, config_file: Path | None) -> str:
    """The parser's help plus every config field: `--name=DEFAULT  doc`, and the value the config file sets when
    it differs from the built-in default."""
    from_file = load_config(config_file).flat() if config_file else {}
    lines = [
        parser.format_help().rstrip(),
        "",
        "config fields (override any with --section.key=VALUE; a list as a,b or [a, b]; null for none):",
    ]
    for f in field_docs(Config):
        set_by_file = f.name in from_file and from_file[f.name] != f.default
        where = f"   ({config_file.name}: {show(from_file[f.name])})" if set_by_file else ""
        lines.append(f"  --{f.name}={show(f.default)}{where}")
        lines.append(f"      {f.type}. {f.doc}")
    return "\n".join(lines) + "\n"


def resolved_yaml(cfg: Config) -> str:
    """The config as a YAML file that `--config` reads back to the same Config."""

    def plain(v):
        return (
            [plain(x) for x in v]
            if isinstance(v, (list, tuple))
            else ({k: plain(x) for k, x in v.items()} if isinstance(v, dict) else v)
        )

    return yaml.safe_dump(plain(cfg.to_dict()), sort_keys=False, allow_unicode=True)


def _parse(
    prog: str, doc: str, argv: list[str], default: Path = DEFAULT_CONFIG
) -> tuple[argparse.Namespace, Config | None]:
    """Options and the config; None when --help or --print-config printed what was asked. Raises ConfigError."""
    parser = _config_parser(prog, doc)
    args, overrides = parser.parse_known_args(argv)
    config_file = Path(args.config) if args.config else _default_config(default)
    if args.help:
        console(config_help(parser, config_file if config_file and config_file.exists() else None).removesuffix("\n"))
        return args, None
    cfg = load_config(config_file, overrides)
    if args.print_config:
        console(resolved_yaml(cfg).removesuffix("\n"))  # both end with one newline
        return args, None
    return args, cfg


def _command_argv(argv: list[str] | None) -> list[str]:
    """The command's arguments (sys.argv's by default), with logging set up as every command logs."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return list(sys.argv[1:] if argv is None else argv)


def _fail(e: BaseException) -> int:
    console(f"bco-ray: {e.kind} error: {e}" if isinstance(e, BcoRayError) else f"bco-ray: input error: {e}", sys.stderr)
    return e.exit_code if isinstance(e, BcoRayError) else 2


def resume_command(prog: str, argv: list[str]) -> str:
    """The command that resumes this run: the same one (its run name and output locations are in it or in its
    config file), submitted the same way."""
    cmd = shlex.join([*shlex.split(prog), *argv])
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):  # a `ray job submit` entrypoint
        return f"ray job submit --working-dir . --runtime-env configs/runtime_env.yaml -- {cmd}"
    return cmd


def _print_dry_run(cfg: Config, paths) -> None:
    console(
        f"[bco-ray] dry run: config, data, models and hub settings check out; no Ray work done.\n"
        f"[bco-ray]   data: train {cfg.data.train}, eval {cfg.data.eval}\n"
        f"[bco-ray]   models: policy {paths.policy}, reference {paths.reference}, tokenizer {paths.tokenizer}"
        + (f", embedder {paths.embedder}" if paths.embedder else "")
        + "\n"
        f"[bco-ray]   outputs {cfg.output_dir}, cache {cfg.precompute.cache_dir}, checkpoints "
        f"{cfg.train.storage_path}"
    )


def _command(prog: str, doc: str, argv: list[str] | None, body, precompute: bool, online: bool = False) -> int:
    """A config command: its options and config, checked (bco_ray/job/checks.py: run_checks, the job's one
    resolution of its locations) where the command needs it now: a precompute command, or --dry-run (which
    prints what was checked); then `body(prog, argv, config, checks' result or None)` (a train job runs its
    checks itself; `online`: the online job's config and checks). Returns the exit status."""
    argv = _command_argv(argv)
    try:
        args, cfg = _parse(prog, doc, argv, ONLINE_CONFIG if online else DEFAULT_CONFIG)
        if cfg is None:
            return 0
        checked = None
        if online and args.dry_run:
            from bco_ray.job.online import check_online_job

            checked = check_online_job(cfg)[0]  # exactly the checks run_online makes before it starts Ray
        elif precompute or args.dry_run:
            from bco_ray.job.checks import run_checks

            checked = run_checks(cfg, hub=not precompute)  # exactly the checks run_job makes before it starts Ray
        if args.dry_run:
            _print_dry_run(checked.cfg, checked.paths)
            return 0
    except (BcoRayError, FileNotFoundError) as e:
        return _fail(e)
    return body(prog, argv, cfg, checked)


def train(argv: list[str] | None = None, prog: str = "bco-ray train") -> int:
    """`bco-ray train`: the whole job (bco_ray/job/run.py). Returns the exit status."""
    return _command(prog, TRAIN_DOC, argv, _train, precompute=False)


def _train(prog: str, argv: list[str], cfg: Config, _checked) -> int:
    from bco_ray.job import run

    return _run(run.run_job, prog, argv, cfg)


def online(argv: list[str] | None = None, prog: str = "bco-ray online") -> int:
    """`bco-ray online`: the online job (bco_ray/job/online.py). Returns the exit status."""
    return _command(prog, ONLINE_DOC, argv, _online, precompute=False, online=True)


def _online(prog: str, argv: list[str], cfg: Config, _checked) -> int:
    from bco_ray.job import online

    return _run(online.run_online, prog, argv, cfg)


def _run(job, prog: str, argv: list[str], cfg: Config) -> int:
    """`job(cfg)` (run_job, run_online) as a command: its exit status, and how to resume it where it stopped."""
    # `ray job stop` and schedulers send SIGTERM: it ends the job like Ctrl-C, the MLflow run marked KILLED, and
    # the command with 143 (130 for Ctrl-C). Checkpoints and the precompute cache are committed atomically, so
    # nothing half-written is trusted.
    signals.install()
    try:
        job(cfg)
    except KeyboardInterrupt as e:
        stop = signals.interrupted(e)
        console(f"bco-ray: {stop}", sys.stderr)
        _print_resume(prog, argv, cfg)
        return stop.exit_code
    except (BcoRayError, FileNotFoundError) as e:
        if isinstance(e, BcoRayError) and e.kind == "resources":
            _print_resume(prog, argv, cfg)
        return _fail(e)
    except BaseException:
        _print_resume(prog, argv, cfg)
        raise
    return 0


def _print_resume(prog: str, argv: list[str], cfg: Config) -> None:
    if cfg.mlflow.run_name:
        console(
            f"bco-ray: resume this run (from its last checkpoint, reusing the precompute cache) with:\n"
            f"  {resume_command(prog, argv)}",
            sys.stderr,
        )
    else:
        console(
            "bco-ray: give the run a name (--mlflow.run_name=NAME) to make it resumable by running the same "
            "command again",
            sys.stderr,
        )


def precompute(argv: list[str] | None = None, prog: str = "bco-ray precompute") -> int:
    """`bco-ray precompute`: only the Ray Data pass, into the precompute cache. Returns the exit status."""
    return _command(prog, PRECOMPUTE_DOC, argv, _precompute, precompute=True)


def _precompute(prog: str, argv: list[str], _cfg: Config, checked) -> int:
    cfg, report, paths = checked.cfg, checked.data_report, checked.paths
    try:
        from bco_ray.job import run
        from bco_ray.job.preflight import check_shared_paths
        from bco_ray.precompute.pipeline import run_precompute
        from bco_ray.tracking.mlflow_run import tracking_uri

        run.init_ray(cfg)
        check_shared_paths(cfg, paths, tracking_uri(cfg))
    except (BcoRayError, FileNotFoundError) as e:
        return _fail(e)
    signals.install()  # after ray.init(), which makes SIGTERM a sys.exit: exit 143 / 130 as a train job does
    try:
        pre = run_precompute(cfg, paths, report)
    except BcoRayError as e:  # a bad row past the driver's check; another job held the cache key's lease too long
        return _fail(e)
    except KeyboardInterrupt as e:
        stop = signals.interrupted(e)
        console(f"bco-ray: {stop}", sys.stderr)
        return stop.exit_code
    console(f"[bco-ray] precompute {'reused (cache hit)' if pre.reused else 'computed'}: {pre.dir}")
    console(json.dumps(pre.summary.to_dict(), indent=2, default=str))
    return 0


def _compare_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=COMPARE_DOC, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--experiment", required=True, help="MLflow experiment name")
    parser.add_argument("--metric", default="eval/auc", help="metric to compare (default: eval/auc)")
    parser.add_argument(
        "--mode",
        choices=("auto", "max", "min"),
        default="auto",
        help="which value is best; auto: min for loss-like names, else max",
    )
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI")
    parser.add_argument("--out", default="outputs/compare", help="directory for the CSV, Markdown and PNG")
    parser.add_argument("--filter", default="", help="MLflow search filter, e.g. \"params.`udm.enabled` = 'True'\"")
    parser.add_argument(
        "--extra",
        default="loss,rewards/margins,eval/auc,eval/gen/score,eval/gen/score_ref,online/pass_rate",
        help="comma-separated metrics shown with their final value",
    )
    parser.add_argument(
        "--all-params",
        action="store_true",
        help="also list params that only say where things are written (output_dir, cache_dir, "
        "the tracking URI, ...) when they differ",
    )
    parser.add_argument(
        "--smooth",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="EMA-smooth the curves (default: when a curve has > 50 points)",
    )
    return parser


def compare(argv: list[str] | None = None, prog: str = "bco-ray compare") -> int:
    """`bco-ray compare`: a table, CSV, Markdown and PNG of an experiment's runs. Returns the exit status."""
    args = _compare_parser(prog).parse_args(argv)
    from mlflow.tracking import MlflowClient

    from bco_ray.tracking.compare import IGNORED_PARAMS, CompareError, compare_runs, format_table, write_outputs
    from bco_ray.tracking.mlflow_run import normalize_uri

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    uri = normalize_uri(uri) if uri else f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
    try:
        comp = compare_runs(
            MlflowClient(uri),
            args.experiment,
            args.metric,
            args.mode,
            args.filter,
            tuple(m for m in args.extra.split(",") if m),
            ("mlflow.run_name",) if args.all_params else IGNORED_PARAMS,
        )
    except CompareError as e:
        console(f"compare: {e} (tracking URI {uri})", sys.stderr)
        return e.exit_code
    console(format_table(comp))
    paths = write_outputs(comp, args.out, args.smooth)
    console("\n" + "\n".join(f"{k:>8}: {v}" for k, v in paths.items()))
    return 0


COMMANDS = {
    "train": (train, TRAIN_DOC),
    "online": (online, ONLINE_DOC),
    "precompute": (precompute, PRECOMPUTE_DOC),
    "compare": (compare, COMPARE_DOC.split("\n")[0]),
}


def exit_process(status: int) -> NoReturn:
    """End a job script now. After a job, Python's interpreter teardown (freeing the modules and objects of
    torch, transformers, Ray and MLflow) takes 1-2 s and does nothing the job needs: the MLflow run is closed,
    Ray is shut down and the log streams are flushed here first, then the process exits with `status`."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main(argv: list[str] | None = None) -> int:
    """`bco-ray <command> ...`: the console script of the package."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("--version", "-V"):
        console(f"bco-ray {__version__}")
        return 0
    if not argv or argv[0] not in COMMANDS:
        listed = "\n".join(f"  {name:<11} {doc.split(':')[0].split('.')[0]}" for name, (_, doc) in COMMANDS.items())
        console(
            f"usage: bco-ray {{{','.join(COMMANDS)}}} [--help] ...\n       bco-ray --version\n\ncommands:\n{listed}\n",
            sys.stdout if argv[:1] in (["-h"], ["--help"]) else sys.stderr,
        )
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    return COMMANDS[argv[0]][0](argv[1:])


if __name__ == "__main__":
    exit_process(main())
