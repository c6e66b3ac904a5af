"""`BCOTrainer.state` (transformers' TrainerState) and `train()`'s output, built from the job's history (what the job
logged step by step, in its result: bco_ray/tracking/history.py) without Ray or MLflow."""

from __future__ import annotations

import math

import pytest

from bco_ray.api._state import log_history, result_metrics, trainer_state, training_loss
from bco_ray.config.schema import load_config
from bco_ray.tracking.history import by_step, card_metrics, entry, last_values


@pytest.fixture(scope="module")
def history() -> list[dict]:
    """A finished-looking job: precompute metrics at step 0, training logs at steps 2 and 4 (logging_steps=2),
    eval at step 2 and the final eval at step 4 (separate entries, as rank 0 logs them), the phase timings."""
    out = [entry(0, {"precompute/rows": 48, "udm/accuracy": 0.7})]
    for step, loss, epoch, eval_loss, auc in ((2, 0.69, 0.5, 0.7, 0.55), (4, 0.61, 1.0, 0.65, 0.6)):
        train = {"loss": loss, "learning_rate": 1e-3, "grad_norm": 0.4, "rewards/chosen": 0.01 * step, "epoch": epoch}
        out += [{"step": step, **train}, {"step": step, "eval/loss": eval_loss, "eval/auc": auc}]
    return out


def test_trainer_state_from_the_job_history(history):
    cfg = load_config(overrides=["--train.max_steps=4", "--train.logging_steps=2", "--train.micro_batch_size=8"])
    state = trainer_state(history, cfg.train, global_step=4, train_runtime=12.5, training_loss=0.65)
    assert (state.global_step, state.max_steps, state.epoch, state.logging_steps) == (4, 4, 1.0, 2)
    assert (state.train_batch_size, state.best_metric, state.best_model_checkpoint) == (8, None, None)
    assert (state.eval_steps, state.save_steps) == (cfg.train.eval_steps, cfg.train.save_steps)
    assert state.is_world_process_zero
    assert state.log_history == [
        {"loss": 0.69, "learning_rate": 1e-3, "grad_norm": 0.4, "rewards/chosen": 0.02, "epoch": 0.5, "step": 2},
        {"eval_loss": 0.7, "eval_auc": 0.55, "epoch": 0.5, "step": 2},
        {"loss": 0.61, "learning_rate": 1e-3, "grad_norm": 0.4, "rewards/chosen": 0.04, "epoch": 1.0, "step": 4},
        {"eval_loss": 0.65, "eval_auc": 0.6, "epoch": 1.0, "step": 4},
        {"train_runtime": 12.5, "train_loss": 0.65, "epoch": 1.0, "step": 4},
    ]
    assert all(type(h["step"]) is int and type(h["epoch"]) is float for h in state.log_history)
    # a run without max_steps: the planned total is what it trained
    cfg = load_config(overrides=["--train.max_steps=-1"])
    assert trainer_state(history, cfg.train, global_step=4).max_steps == 4


def test_train_output_metrics_from_the_job_history(history):
    assert training_loss(history) == pytest.approx((0.69 + 0.61) / 2)
    assert math.isnan(training_loss([entry(0, {"precompute/rows": 1})]))
    m = result_metrics(history, {"step": 4, "delta": 0.1, "diverged": None, "timings": {}}, 12.345)
    assert m["loss"] == 0.61 and m["eval/auc"] == 0.6 and m["precompute/rows"] == 48.0 and m["udm/accuracy"] == 0.7
    assert (m["delta"], m["step"], m["train_runtime"], m["train_loss"]) == (0.1, 4, 12.35, pytest.approx(0.65))
    assert "timings" not in m and "diverged" not in m
    # the model card: the last training values and the worker's final record
    card = card_metrics(history, {"step": 4, "eval/auc": 0.6})
    assert card == {"loss": 0.61, "rewards/chosen": 0.04, "step": 4, "eval/auc": 0.6}


def test_history_merges_a_step_and_keeps_the_last_value():
    h = [{"step": 3, "loss": 1.0}, {"step": 1, "loss": 2.0}, {"step": 3, "loss": 0.5, "eval/auc": 0.6}]
    assert by_step(h) == {1: {"loss": 2.0}, 3: {"loss": 0.5, "eval/auc": 0.6}} and list(by_step(h)) == [1, 3]
    assert last_values(h) == {"loss": 0.5, "eval/auc": 0.6}
    assert entry(2, {"step": 9, "time/fit": 3}) == {"step": 2, "time/fit": 3.0}


def test_log_history_leaves_out_the_pass_metrics():
    history = [{"step": 0, "precompute/rows": 1.0, "udm/auc": 0.5}, {"step": 1, "loss": 0.5}]
    assert log_history(history) == [{"loss": 0.5, "epoch": 0.0, "step": 1}]


def test_trainer_state_before_train_is_the_initial_one(tmp_path):
    from bco_ray import BCOConfig, BCOTrainer
    from bco_ray.builtin import materialize_tiny_model

    path = str(materialize_tiny_model(tmp_path / "m", seed=0))
    trainer = BCOTrainer(
        model=path,
        args=BCOConfig(output_dir=str(tmp_path / "o")),
        train_dataset=[{"prompt": "1+1=", "completion": "2", "label": True}],
    )
    assert trainer.state.global_step == 0 and trainer.state.log_history == []
