"""The `bco-ray` command line (bco_ray/cli.py, and jobs/*.py over it): --help lists every config field with its
default and doc, --print-config writes a YAML that reads back to the same config, --dry-run runs every check and
no Ray work, and each error kind ends with its message and exit status (plus, for a named run that fails once
started, the command that resumes it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bco_ray import cli
from bco_ray.config.doc import field_docs, show
from bco_ray.config.schema import Config, ConfigError, load_config
from bco_ray.errors import BcoRayError
from bco_ray.job import run

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def no_ray(monkeypatch):
    def init_ray(cfg):
        raise AssertionError("the command reached Ray")

    monkeypatch.setattr(run, "init_ray", init_ray)


def test_help_lists_every_config_field_with_default_and_doc(capsys):
    assert cli.train(["--help"]) == 0
    out = capsys.readouterr().out
    fields = field_docs(Config)
    assert len(fields) == len(Config().flat())  # every leaf field of the config
    for f in fields:
        assert f.doc, f"config field {f.name} has no comment in its dataclass"
        assert f"  --{f.name}={show(f.default)}" in out, f.name
        assert f"{f.type}. {f.doc}" in out, f.name
    assert "--train.lr=5.0e-07" in out and "peak learning rate" in out
    # A value the default config file sets differently is shown next to the built-in default.
    assert "--model.policy=builtin:tiny-qwen2   (tiny.yaml: builtin:tiny-qwen2-sft)" in out
    for flag in ("--config FILE", "--print-config", "--dry-run"):
        assert flag in out


def test_print_config_reads_back_to_the_same_config(tmp_path, capsys, no_ray):
    args = ["--train.lr=1e-6", "--precompute.ref_actors=1,2", "--data.eval=null", "--train.lora.target_modules=q_proj"]
    assert cli.train(["--print-config", *args]) == 0
    printed = tmp_path / "resolved.yaml"
    printed.write_text(capsys.readouterr().out)
    assert load_config(printed) == load_config(cli.DEFAULT_CONFIG, args)
    assert load_config(printed).precompute.ref_actors == (1, 2) and load_config(printed).data.eval is None


def test_dry_run_checks_everything_and_starts_no_ray(tmp_path, capsys, no_ray, monkeypatch):
    assert cli.train(["--dry-run", f"--output_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "dry run: config, data, models and hub settings check out; no Ray work done" in out
    assert f"outputs {tmp_path}" in out and "embedder " in out
    assert not (tmp_path / "ray").exists() and not (tmp_path / "cache").exists()
    # The same checks fail the same way as a real run: a missing policy is an input error, exit status 2.
    assert cli.precompute(["--dry-run", f"--output_dir={tmp_path}", "--model.policy=./no/such/model"]) == 2
    assert "bco-ray: input error: model.policy: './no/such/model' does not exist" in capsys.readouterr().err
    monkeypatch.delenv("HF_TOKEN", raising=False)  # the hub settings: a push needs a token
    assert cli.train(["--dry-run", f"--output_dir={tmp_path}", "--hub.repo_id=org/name"]) == 2
    assert "bco-ray: input error: hub.repo_id='org/name' pushes the model" in capsys.readouterr().err


def test_precompute_resolves_its_locations_once_and_hands_them_on(tmp_path, capsys, monkeypatch):
    """`bco-ray precompute`: one resolution (the job's checks, without the hub settings: a pass pushes nothing);
    the preflight and the pass take the resolved config and the checked model paths as given."""
    from types import SimpleNamespace

    from bco_ray.job import checks, preflight
    from bco_ray.job.locations import resolve_locations
    from bco_ray.precompute import pipeline

    resolved, seen = [], {}
    monkeypatch.setattr(checks, "resolve_locations", lambda c: resolved.append(c) or resolve_locations(c))
    monkeypatch.setattr(run, "init_ray", lambda c: False)
    monkeypatch.setattr(preflight, "check_shared_paths", lambda c, p, uri: seen.update(preflight=(c, p)) or 1)

    def run_precompute(cfg, paths, report):
        seen["pass"] = (cfg, paths)
        summary = SimpleNamespace(to_dict=lambda: {"rows": report.train.rows})
        return SimpleNamespace(reused=True, dir="d", summary=summary)

    monkeypatch.setattr(pipeline, "run_precompute", run_precompute)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert cli.precompute([f"--output_dir={tmp_path}", "--hub.repo_id=org/name"]) == 0
    cfg, paths = seen["pass"]
    assert len(resolved) == 1 and seen["preflight"] == seen["pass"]
    assert cfg.precompute.cache_dir == str(tmp_path / "cache") and cfg.train.storage_path == str(tmp_path / "ray")
    assert paths.pad_id is not None and "precompute reused (cache hit): d" in capsys.readouterr().out


@pytest.mark.parametrize(
    "error, kind, code",
    [
        (run.ModelError("model.policy: bad"), "input", 2),
        (run.ResourcesUnavailableError("the worker group did not start"), "resources", 3),
        (__import__("bco_ray.job.preflight", fromlist=["x"]).SharedStorageError("cache not shared"), "storage", 4),
        (FileNotFoundError("data.train: no such file"), "input", 2),
    ],
)
def test_each_error_kind_has_its_message_and_exit_status(monkeypatch, capsys, error, kind, code):
    def run_job(cfg):
        raise error

    monkeypatch.setattr(run, "run_job", run_job)
    assert cli.train(["--mlflow.run_name=r1", "--train.lr=1e-6"], prog="python jobs/bco.py") == code
    err = capsys.readouterr().err
    assert f"bco-ray: {kind} error: {error}" in err
    # Only a run that got as far as asking the cluster for resources has something to resume.
    assert ("python jobs/bco.py --mlflow.run_name=r1 --train.lr=1e-6" in err) == (kind == "resources")


def test_config_error_exit_status_and_unexpected_errors_print_the_resume_command(monkeypatch, capsys):
    assert cli.train(["--train.beta=0"]) == 2
    assert "bco-ray: config error: train.beta must be > 0" in capsys.readouterr().err

    def run_job(cfg):
        raise KeyboardInterrupt  # Ctrl-C: exit status 130 (bco_ray/job/signals.py)

    monkeypatch.setattr(run, "run_job", run_job)
    code = cli.train(
        ["--config", str(ROOT / "configs" / "tiny.yaml"), "--mlflow.run_name=r2", "--mlflow.experiment=my sweep"],
        prog="bco-ray train",
    )
    assert code == 130
    err = capsys.readouterr().err
    assert (
        f"  bco-ray train --config {ROOT / 'configs' / 'tiny.yaml'} --mlflow.run_name=r2 '--mlflow.experiment=my sweep'"
        in err
    )
    assert cli.train([]) == 130
    assert "--mlflow.run_name=NAME" in capsys.readouterr().err  # unnamed: how to make it resumable

    def crash(cfg):
        raise RuntimeError("a bug")

    monkeypatch.setattr(run, "run_job", crash)
    with pytest.raises(RuntimeError):
        cli.train(["--mlflow.run_name=r3"], prog="bco-ray train")
    assert "bco-ray train --mlflow.run_name=r3" in capsys.readouterr().err


def test_error_classes_share_one_base_and_keep_their_builtin_bases():
    from bco_ray.data.checks import DataError
    from bco_ray.data.formats import DataFormatError
    from bco_ray.eval.generation import VerifierError
    from bco_ray.job.preflight import SharedStorageError
    from bco_ray.models import ModelLoadError
    from bco_ray.precompute.embedding_func import EmbeddingFuncError
    from bco_ray.tracking.compare import CompareError
    from bco_ray.tracking.hub import HubError

    kinds = {
        ConfigError: ("config", 2),
        DataError: ("input", 2),
        DataFormatError: ("input", 2),
        run.ModelError: ("input", 2),
        ModelLoadError: ("input", 2),
        EmbeddingFuncError: ("input", 2),
        VerifierError: ("input", 2),
        HubError: ("input", 2),
        CompareError: ("input", 2),
        run.ResourcesUnavailableError: ("resources", 3),
        SharedStorageError: ("storage", 4),
    }
    for cls, (kind, code) in kinds.items():
        assert issubclass(cls, BcoRayError) and (cls.kind, cls.exit_code) == (kind, code), cls
        assert issubclass(cls, RuntimeError if kind == "resources" else ValueError), cls


def test_console_script_and_job_scripts():
    """The installed `bco-ray` script and `python jobs/bco.py` (no sys.path patching: the package is installed,
    and `ray job submit --working-dir .` puts the working directory on the driver's PYTHONPATH)."""
    version = subprocess.run([BIN / "bco-ray", "--version"], capture_output=True, text=True, check=True).stdout
    assert version.strip() == f"bco-ray {__import__('bco_ray').__version__}"
    usage = subprocess.run([BIN / "bco-ray"], capture_output=True, text=True)
    assert usage.returncode == 2 and "bco-ray {train,online,precompute,compare}" in usage.stderr
    for script, text in (
        ("bco.py", "--train.beta=0.1"),
        ("precompute.py", "--precompute.force=false"),
        ("compare.py", "--experiment EXPERIMENT"),
    ):
        proc = subprocess.run(
            [sys.executable, str(ROOT / "jobs" / script), "--help"],
            capture_output=True,
            text=True,
            cwd="/",
            timeout=120,
        )
        assert proc.returncode == 0 and text in proc.stdout, proc.stderr[-2000:]
