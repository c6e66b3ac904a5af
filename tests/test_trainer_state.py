"""`BCOTrainer.state` (transformers' TrainerState) rebuilt from a run's MLflow history, without Ray: the run is
made here in a temporary sqlite store with the metrics the training loop logs."""

from __future__ import annotations

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from bco_ray.api._state import log_history, trainer_state
from bco_ray.config.schema import load_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished-looking run: precompute metrics at step 0, training logs at steps 1-4 (logging_steps=2 plus
    the last step), eval at step 2 and the final eval at step 4."""
    client = MlflowClient(f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("state")).info.run_id
    points = [("precompute/rows", 48.0, 0), ("udm/accuracy", 0.7, 0)]
    for step, loss, epoch in ((2, 0.69, 0.5), (4, 0.61, 1.0)):
        points += [
            ("loss", loss, step),
            ("learning_rate", 1e-3, step),
            ("grad_norm", 0.4, step),
            ("rewards/chosen", 0.01 * step, step),
            ("epoch", epoch, step),
        ]
    points += [("eval/loss", 0.7, 2), ("eval/auc", 0.55, 2), ("eval/loss", 0.65, 4), ("eval/auc", 0.6, 4)]
    client.log_batch(run_id, metrics=[Metric(k, v, 1000 + i, s) for i, (k, v, s) in enumerate(points)])
    return client, run_id


def test_trainer_state_from_the_mlflow_history(run):
    client, run_id = run
    cfg = load_config(overrides=["--train.max_steps=4", "--train.logging_steps=2", "--train.micro_batch_size=8"])
    state = trainer_state(client, run_id, cfg.train, global_step=4, train_runtime=12.5, training_loss=0.65)
    assert (state.global_step, state.max_steps, state.epoch, state.logging_steps) == (4, 4, 1.0, 2)
    assert (state.train_batch_size, state.best_metric, state.best_model_checkpoint) == (8, None, None)
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
    assert trainer_state(client, run_id, cfg.train, global_step=4).max_steps == 4


def test_log_history_leaves_out_the_pass_metrics():
    history = {0: {"precompute/rows": 1.0, "udm/auc": 0.5}, 1: {"loss": 0.5}}
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
