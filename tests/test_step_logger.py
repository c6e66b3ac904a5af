"""The step logger shows each logged step once, also under Ray Train's patched `print`.

Ray Train 2.60 workers replace `builtins.print` with `redirected_print`: in a Ray worker `sys.stdout` is not
`sys.__stdout__`, so it prints the text *and* logs it on the root logger, whose console handler writes it to
stderr; the driver shows both. The test reproduces that set-up (capsys also replaces sys.stdout) and checks that
a `print` there comes out twice while the step logger's line comes out once."""

from __future__ import annotations

import builtins
import logging
import sys

import pytest
from mlflow.tracking import MlflowClient

from bco_ray.tracking.step_logger import StepLogger, console


def _ray_train_print():
    """Ray Train's patched print, or a stand-in that does the same (tee + root logger) if Ray moved it."""
    try:
        from ray.train.v2._internal.logging.patch_print import redirected_print

        return redirected_print
    except ImportError:  # pragma: no cover - same behaviour, written out
        original = builtins.print

        def redirected_print(*objects, sep=" ", end="\n", file=None, flush=False):
            if sys.stdout is not sys.__stdout__:
                original(*objects, sep=sep, end=end, file=file, flush=flush)
            logging.getLogger().info(sep.join(map(str, objects)))

        return redirected_print


@pytest.fixture
def ray_worker_print(monkeypatch):
    """builtins.print as in a Ray Train worker, with the root logger's console handler on stderr."""
    root = logging.getLogger()
    # only the worker's console handler: Ray's PlainRayHandler writes to sys.stderr as it is at emit time
    monkeypatch.setattr(root, "handlers", [logging._StderrHandler()])
    monkeypatch.setattr(root, "level", logging.INFO)
    monkeypatch.setattr(builtins, "print", _ray_train_print())


@pytest.fixture
def step_logger(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("steps")).info.run_id
    return (
        StepLogger({"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "run_id": run_id}, rank=0, buffered=True),
        client,
        run_id,
    )


def _lines(capsys, text: str) -> list[str]:
    out = capsys.readouterr()
    return [line for line in (out.out + out.err).splitlines() if text in line]


def test_a_print_in_a_ray_train_worker_comes_out_twice(ray_worker_print, capsys):
    """The cause of the doubled step lines (what the step logger did before)."""
    print("[bco-ray] step 3: loss=0.5", flush=True)
    assert len(_lines(capsys, "[bco-ray] step 3:")) == 2


def test_each_step_line_comes_out_once(ray_worker_print, capsys, step_logger):
    logger, client, run_id = step_logger
    logger.log({"loss": 0.5, "grad_norm": 1.25}, step=3)
    logger.log({"eval/loss": 0.6}, step=4)
    assert _lines(capsys, "[bco-ray] step") == [
        "[bco-ray] step 3: loss=0.5 grad_norm=1.25",
        "[bco-ray] step 4: eval/loss=0.6",
    ]
    logger.flush()
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [3]


def test_one_line_per_log_call_and_none_on_other_ranks(capsys, step_logger):
    logger, _, _ = step_logger
    for step in (1, 2):
        logger.log({"loss": 0.5}, step=step)
    assert capsys.readouterr().out == "[bco-ray] step 1: loss=0.5\n[bco-ray] step 2: loss=0.5\n"
    StepLogger({"run_id": "x"}, rank=1, buffered=False).log({"loss": 0.5}, step=1)
    assert capsys.readouterr().out == ""


def test_console_writes_one_line(capsys):
    console("hello")
    console("warn", sys.stderr)
    out = capsys.readouterr()
    assert (out.out, out.err) == ("hello\n", "warn\n")
