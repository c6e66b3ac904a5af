"""`BCOTrainer.state`: a transformers `TrainerState` rebuilt from the run's MLflow metric history, so that
scripts written for TRL can read `trainer.state.global_step`, `trainer.state.log_history`, ... after `train()`.

`log_history` follows transformers' Trainer: one dict per logged step with the training metrics, `"epoch"` and
`"step"` (`{"loss": ..., "grad_norm": ..., "learning_rate": ..., "rewards/chosen": ..., "epoch": 0.5,
"step": 10}`), an eval dict at the steps that evaluated (MLflow's `eval/loss` as `eval_loss`, as Trainer
names them), and a last summary dict (`train_runtime`, `train_loss`, `epoch`, `step`). The pass's one-off
`precompute/*` and `udm/*` metrics (step 0) are not training logs: they are in `trainer.result.metrics`.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

NOT_LOGS = ("precompute/", "udm/")


def metric_history(client: Any, run_id: str) -> dict[int, dict[str, float]]:
    """{step: {metric: value}} of every metric of the run (the last value where a step holds several)."""
    by_step: dict[int, dict[str, float]] = defaultdict(dict)
    for key in client.get_run(run_id).data.metrics:
        for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp)):
            by_step[int(m.step)][key] = float(m.value)
    return dict(by_step)


def log_history(history: dict[int, dict[str, float]]) -> list[dict[str, float]]:
    """transformers' `log_history` entries, step by step: the training log, then the eval log."""
    out: list[dict[str, float]] = []
    epoch = 0.0
    for step in sorted(history):
        metrics = {k: v for k, v in history[step].items() if not k.startswith(NOT_LOGS)}
        train = {k: v for k, v in metrics.items() if not k.startswith("eval/")}
        evals = {"eval_" + k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("eval/")}
        epoch = train.pop("epoch", epoch)
        if train:
            out.append({**train, "epoch": epoch, "step": step})
        if evals:
            out.append({**evals, "epoch": epoch, "step": step})
    return out


def trainer_state(
    client: Any,
    run_id: str,
    train_cfg: Any,
    global_step: int,
    train_runtime: float | None = None,
    training_loss: float | None = None,
):
    """A `transformers.TrainerState` of the finished run `run_id` (its MLflow history), trained with `train_cfg`
    (bco-ray's TrainConfig) for `global_step` optimizer steps."""
    from transformers import TrainerState

    logs = log_history(metric_history(client, run_id))
    epoch = next((h["epoch"] for h in reversed(logs)), 0.0)
    summary: dict[str, float] = {}
    if train_runtime is not None:
        summary["train_runtime"] = float(train_runtime)
    if training_loss is not None:
        summary["train_loss"] = float(training_loss)
    if summary:
        logs.append({**summary, "epoch": epoch, "step": global_step})
    return TrainerState(
        epoch=epoch,
        global_step=global_step,
        max_steps=train_cfg.max_steps if train_cfg.max_steps > 0 else global_step,
        logging_steps=train_cfg.logging_steps,
        eval_steps=train_cfg.eval_steps,
        save_steps=train_cfg.save_steps,
        train_batch_size=train_cfg.micro_batch_size,
        num_train_epochs=train_cfg.num_epochs,
        log_history=logs,
        is_local_process_zero=True,
        is_world_process_zero=True,
    )
