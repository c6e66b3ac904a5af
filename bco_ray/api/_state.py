"""`BCOTrainer.state` and `train()`'s output from the job's result: its history (`JobResult.history`, what the job
logged step by step: bco_ray/tracking/history.py), never read back from MLflow, so that scripts written for TRL can
read `trainer.state.global_step`, `trainer.state.log_history`, `train()`'s `training_loss`, ... after `train()`.

`log_history` follows transformers' Trainer: one dict per logged step with the training metrics, `"epoch"` and
`"step"` (`{"loss": ..., "grad_norm": ..., "learning_rate": ..., "rewards/chosen": ..., "epoch": 0.5,
"step": 10}`), an eval dict at the steps that evaluated (`eval/loss` as `eval_loss`, as Trainer names them), and
a last summary dict (`train_runtime`, `train_loss`, `epoch`, `step`). The pass's one-off `precompute/*` and
`udm/*` metrics (step 0) are not training logs: they are in `trainer.result.metrics`.
"""

from __future__ import annotations

import math
from typing import Any

from bco_ray.tracking.history import by_step, last_values, values

NOT_LOGS = ("precompute/", "udm/")
# TrainerState fields that are bco-ray's TrainConfig fields of the same name
SAME_NAMES = ("logging_steps", "eval_steps", "save_steps")


def log_history(history: list[dict]) -> list[dict[str, float]]:
    """transformers' `log_history` entries, step by step: the training log, then the eval log."""
    out: list[dict[str, float]] = []
    epoch = 0.0
    for step, logged in by_step(history).items():
        metrics = {k: v for k, v in logged.items() if not k.startswith(NOT_LOGS)}
        train = {k: v for k, v in metrics.items() if not k.startswith("eval/")}
        evals = {"eval_" + k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("eval/")}
        epoch = float(train.pop("epoch", epoch))
        if train:
            out.append({**train, "epoch": epoch, "step": step})
        if evals:
            out.append({**evals, "epoch": epoch, "step": step})
    return out


def training_loss(history: list[dict]) -> float:
    """The mean of the run's logged `loss` values (TrainOutput.training_loss); NaN when none was logged."""
    losses = values(history, "loss")
    return float(sum(losses) / len(losses)) if losses else math.nan


def result_metrics(history: list[dict], final: dict, train_runtime: float) -> dict:
    """`train()`'s metrics: the last value of every metric the job logged, the worker's final record (numbers),
    `train_runtime` and `train_loss`."""
    metrics = last_values(history)
    metrics.update({k: v for k, v in final.items() if isinstance(v, (int, float))})
    metrics.update(train_runtime=round(train_runtime, 2), train_loss=training_loss(history))
    return metrics


def trainer_state(
    history: list[dict],
    train_cfg: Any,
    global_step: int,
    train_runtime: float | None = None,
    training_loss: float | None = None,
):
    """A `transformers.TrainerState` of the finished run whose job logged `history`, trained with `train_cfg`
    (bco-ray's TrainConfig) for `global_step` optimizer steps."""
    from transformers import TrainerState

    logs = log_history(history)
    epoch = next((h["epoch"] for h in reversed(logs)), 0.0)
    summary = {"train_runtime": train_runtime, "train_loss": training_loss}
    summary = {k: float(v) for k, v in summary.items() if v is not None}
    if summary:
        logs.append({**summary, "epoch": epoch, "step": global_step})
    return TrainerState(
        epoch=epoch,
        global_step=global_step,
        max_steps=train_cfg.max_steps if train_cfg.max_steps > 0 else global_step,
        train_batch_size=train_cfg.micro_batch_size,
        num_train_epochs=train_cfg.num_epochs,
        log_history=logs,
        is_local_process_zero=True,
        is_world_process_zero=True,
        **{k: getattr(train_cfg, k) for k in SAME_NAMES},
    )
