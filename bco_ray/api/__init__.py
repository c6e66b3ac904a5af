"""Drop-in Python API for users of TRL's (deleted) `BCOTrainer`: the familiar snippet runs on Ray.

    from bco_ray import BCOConfig, BCOTrainer          # was: from trl.experimental.bco import ...

    training_args = BCOConfig(output_dir=output_dir, per_device_train_batch_size=8, gradient_accumulation_steps=2)
    trainer = BCOTrainer(model=model, ref_model=ref_model, args=training_args,
                         processing_class=tokenizer, train_dataset=dataset["train"])
    result = trainer.train()     # Ray Data precompute → Ray Train + DeepSpeed → MLflow (bco_ray.job.run.run_job)

`BCOConfig` takes the reference's field names (and TRL's defaults) and maps them onto bco-ray's typed
`Config` (`BCOConfig.to_config`); fields of TRL/transformers with no meaning here are accepted with a
warning, unknown names raise TypeError. `BCOTrainer` saves in-memory models, tokenizers, datasets and the
UDM embedding function once, content-addressed, under `inputs_dir` (default `$BCO_RAY_STORAGE/inputs`, else
`<output_dir>/inputs`; a path or an `s3://` URI: the workers and actors load them from there), builds the Config and runs the job. See docs/trl_migration.md.

`OnlineBCOConfig` / `OnlineBCOTrainer` (api/online_config.py, api/online_trainer.py): the same for online BCO, in
the shape of trl's online trainers (`reward_funcs`, GRPOConfig's generation fields), running the online job.
"""

from bco_ray.api.config import BCOConfig, BCOConfigWarning
from bco_ray.api.online_config import OnlineBCOConfig

__all__ = ["BCOConfig", "BCOTrainer", "BCOTrainOutput", "BCOConfigWarning", "OnlineBCOConfig", "OnlineBCOTrainer"]


def __getattr__(name: str):
    # The trainer brings the job's stack (torch, transformers, Ray, MLflow): imported when first asked for, so
    # that `from bco_ray import BCOConfig` stays instant.
    if name in ("BCOTrainer", "BCOTrainOutput"):
        from bco_ray.api import trainer

        return getattr(trainer, name)
    if name == "OnlineBCOTrainer":
        from bco_ray.api import online_trainer

        return online_trainer.OnlineBCOTrainer
    raise AttributeError(f"module 'bco_ray.api' has no attribute {name!r}")
