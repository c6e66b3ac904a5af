"""`BCOTrainer`: TRL's call shape, backed by the Ray pipeline (`bco_ray.job.run.run_job`)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerState

from bco_ray.api import _embedding, _evaluate, _hub
from bco_ray.api._io import (
    _as_dataset,
    _dumps_by_value,
    _is_peft_model,
    _load_model_dir,
    _lora,
    _save_by_content,
    inputs_root,
)
from bco_ray.api._mapping import _to_config
from bco_ray.api._state import result_metrics, trainer_state, training_loss
from bco_ray.api.config import BCOConfig, BCOConfigWarning
from bco_ray.config.schema import Config
from bco_ray.job.run import JobResult, init_ray, run_job
from bco_ray.remote import local_model_dir
from bco_ray.storage import join


@dataclass
class BCOTrainOutput:
    """What `BCOTrainer.train()` returns: transformers' TrainOutput fields plus where the results are."""

    global_step: int
    training_loss: float  # mean of the logged `loss` values of the run
    metrics: dict  # train_runtime, train_loss, and the last value of every metric the job logged
    model_dir: str  # the trained model, Hugging Face format (AutoModelForCausalLM.from_pretrained)
    output_dir: str  # <output_dir>/runs/<run_name>: result.json, model/
    run_id: str  # MLflow run
    tracking_uri: str
    run_name: str
    raw: JobResult | None = field(repr=False, default=None)  # what bco_ray.job.run.run_job returned


class BCOTrainer:
    """TRL's `BCOTrainer` signature; `train()` runs the whole bco-ray job (bco_ray.job.run.run_job) on Ray.

    `model` / `ref_model` / `processing_class` / `embedding_tokenizer`: objects (saved with save_pretrained) or
    hub ids / local directories (passed through). `ref_model=None`: the model's initial weights.
    `train_dataset` / `eval_dataset`: a `datasets.Dataset` (or a list of row dicts / a pandas DataFrame), saved
    to Parquet; or a bco-ray data spec (a file, directory, fsspec URI or `hf:<id>[:split]`).
    `embedding_func(input_ids=..., attention_mask=...) -> Tensor[B, D]` + `embedding_tokenizer`: UDM, as in TRL.
    `peft_config`: a `peft.LoraConfig`, mapped to bco-ray's LoRA settings.
    """

    def __init__(
        self,
        model=None,
        ref_model=None,
        args: BCOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        data_collator=None,
        model_init=None,
        callbacks=None,
        optimizers=(None, None),
        preprocess_logits_for_metrics=None,
        peft_config=None,
        compute_metrics=None,
        model_adapter_name=None,
        ref_adapter_name=None,
        embedding_func: Callable | None = None,
        embedding_tokenizer=None,
    ):
        args = _checked_args(
            model,
            args,
            train_dataset,
            model_init,
            optimizers,
            embedding_func,
            embedding_tokenizer,
            processing_class,
            ignored={
                "data_collator": data_collator,
                "callbacks": callbacks,
                "preprocess_logits_for_metrics": preprocess_logits_for_metrics,
                "compute_metrics": compute_metrics,
                "model_adapter_name": model_adapter_name,
                "ref_adapter_name": ref_adapter_name,
            },
        )
        if ref_model is model:
            ref_model = None

        self.args = args
        self._model, self.ref_model, self.processing_class = model, ref_model, processing_class
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.embedding_func, self.embedding_tokenizer = embedding_func, embedding_tokenizer
        self.peft_config = peft_config
        self.result: BCOTrainOutput | None = None
        self._state = None
        self._trained_model = None
        self.inputs_dir = inputs_root(args.inputs_dir, args.output_dir)  # a local path or an s3:// URI
        self.config = self._build_config()

    # ------------------------------------------------------------------------------- inputs → Config
    def _build_config(self) -> Config:
        a = self.args
        o = a.overrides()
        _to_config(o, {}, a.bco_ray_overrides)  # a bad setting fails here, before anything is saved
        model: dict[str, Any] = {"policy": self._model_spec(self._model), "reference": None, "tokenizer": None}
        if self.ref_model is not None:
            ref = self._model_spec(self.ref_model)
            model["reference"] = None if ref == model["policy"] else ref
        if self.processing_class is not None:
            model["tokenizer"] = self._tokenizer_spec(self.processing_class)
        data = {
            "train": self._data_spec(self.train_dataset, "train"),
            "eval": self._data_spec(self.eval_dataset, "eval") if self.eval_dataset is not None else None,
        }
        udm: dict[str, Any] = {"enabled": a.udm_embedding_model is not None}
        if self.embedding_func is not None:
            udm.update(enabled=True, embedding_func=self._save_embedding_func())
        train: dict[str, Any] = {}
        if self.peft_config is not None:
            train["lora"] = _lora(self.peft_config)
        return _to_config(o, {"model": model, "data": data, "udm": udm, "train": train}, a.bco_ray_overrides)

    def _model_spec(self, m) -> str:
        if isinstance(m, (str, os.PathLike)):
            return os.fspath(m)
        if not hasattr(m, "save_pretrained"):
            raise TypeError(
                f"model/ref_model must be a transformers model, a hub id or a local path, got {type(m).__name__}"
            )
        return self._save_dir("model", lambda d: m.save_pretrained(d, safe_serialization=True))

    def _tokenizer_spec(self, tok) -> str:
        if isinstance(tok, (str, os.PathLike)):
            return os.fspath(tok)
        if not hasattr(tok, "save_pretrained"):
            raise TypeError(f"processing_class must be a tokenizer, got {type(tok).__name__}")
        return self._save_dir("tokenizer", tok.save_pretrained)

    def _save_dir(self, kind: str, save: Callable[[str], Any]) -> str:
        """Save into a temporary directory, then move it to <inputs>/<kind>-<content hash>: saved once per
        content (the policy and an identical reference share one copy, a re-run reuses the precompute cache)."""
        return _save_by_content(join(self.inputs_dir, "models"), kind, save, directory=True)

    def _data_spec(self, ds, split: str) -> str:
        if isinstance(ds, (str, os.PathLike)):
            return os.fspath(ds)
        return _save_by_content(join(self.inputs_dir, "data"), split, _as_dataset(ds, split).to_parquet, ".parquet")

    def _save_embedding_func(self) -> str:
        tok = self.embedding_tokenizer
        if isinstance(tok, (str, os.PathLike)):
            tok = AutoTokenizer.from_pretrained(local_model_dir(os.fspath(tok), weights=False))
        _embedding.check_modules(self.embedding_func)
        record = {"func": self.embedding_func, "tokenizer": tok}
        blob = _dumps_by_value(record, cloudpickle, lambda o: _embedding.dumps(o, cloudpickle))
        return _save_by_content(
            join(self.inputs_dir, "udm"), "embedding_func", lambda p: Path(p).write_bytes(blob), ".pkl"
        )

    # ------------------------------------------------------------------------------------ training
    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs) -> BCOTrainOutput:
        """Run the job: Ray Data precompute → Ray Train + DeepSpeed → MLflow. Blocks until it finishes; updates
        the in-memory model (if one was given) with the trained weights."""
        if resume_from_checkpoint:
            warnings.warn(
                "train(resume_from_checkpoint=...) is not needed: an unfinished run resumes from its "
                "latest checkpoint when it is started again with the same run_name",
                BCOConfigWarning,
                stacklevel=2,
            )
        cfg = self.config
        if self.args.use_gpu is None and not self.args.use_cpu:
            cfg = self._auto_gpu(cfg)
        t0 = time.time()
        res = run_job(cfg)
        self.result = self._train_output(res, time.time() - t0)
        self._state = self._trainer_state(cfg)
        self._trained_model = None
        if not isinstance(self._model, (str, os.PathLike)):
            self._update_in_memory_model()
        return self.result

    def _auto_gpu(self, cfg: Config) -> Config:
        init_ray(cfg)
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus >= cfg.train.num_workers:
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, use_gpu=True))
            if self.args.precompute_num_gpus_per_actor is None:
                cfg = dataclasses.replace(cfg, precompute=dataclasses.replace(cfg.precompute, num_gpus_per_actor=0.5))
        return cfg

    def _train_output(self, res: JobResult, seconds: float) -> BCOTrainOutput:
        """transformers' TrainOutput fields from the job's result and its history (bco_ray/api/_state.py)."""
        where = {k: getattr(res, k) for k in ("model_dir", "run_id", "tracking_uri", "run_name")}
        return BCOTrainOutput(
            global_step=int(res.final.get("step", 0)),
            training_loss=training_loss(res.history),
            metrics=result_metrics(res.history, res.final, seconds),
            output_dir=res.out_dir,
            raw=res,
            **where,
        )

    def _trainer_state(self, cfg: Config):
        """transformers' TrainerState of the finished run, from the job's history (bco_ray/api/_state.py)."""
        r = self.result
        return trainer_state(
            r.raw.history,
            cfg.train,
            r.global_step,
            train_runtime=r.metrics["train_runtime"],
            training_loss=r.training_loss,
        )

    @property
    def state(self):
        """A transformers `TrainerState`, as TRL's trainer has: after train(), `global_step`, `epoch`, `max_steps`
        and `log_history` (one dict per logged step, with "loss", ..., "epoch", "step") come from the job's
        history (its result, not read back from MLflow); before, the empty initial state. `best_metric` / `best_model_checkpoint` stay None."""
        if self._state is None:
            self._state = TrainerState(log_history=[])
        return self._state

    def _update_in_memory_model(self) -> None:
        """The trained weights into the model object the user holds (as TRL trains it in place). With LoRA,
        `trainer.model` becomes a PeftModel wrapping it (peft injects the adapters into it in place)."""
        model_dir = Path(self.result.model_dir)
        user = self._model
        if (model_dir / "adapter_config.json").exists():
            from peft import PeftModel

            self._trained_model = PeftModel.from_pretrained(user, str(model_dir))
            return
        dtype = next(user.parameters()).dtype
        trained = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
        with torch.no_grad():
            missing, unexpected = user.load_state_dict(trained.state_dict(), strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise RuntimeError(
                f"the trained model at {model_dir} does not match the model object "
                f"(missing {missing[:5]}, unexpected {unexpected[:5]}); load it with "
                "AutoModelForCausalLM.from_pretrained"
            )
        self._trained_model = user

    @property
    def model(self):
        """The trained model after train() (the object you passed, updated; or loaded from the run's model
        directory); before, the model you passed (loaded from its id/path on first access)."""
        if self._trained_model is not None:
            return self._trained_model
        if self.result is not None:
            self._trained_model = _load_model_dir(self.result.model_dir)
            return self._trained_model
        if isinstance(self._model, (str, os.PathLike)):
            self._trained_model = _load_model_dir(self.config.model.policy)
            return self._trained_model
        return self._model

    @property
    def tokenizer(self):
        return self.processing_class

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> str:
        """The trained model (Hugging Face format, with its tokenizer) into `output_dir` (default args.output_dir)."""
        out = Path(output_dir or self.args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.result is not None:
            src = Path(self.result.model_dir)
            for p in src.iterdir():
                if p.is_dir():
                    shutil.copytree(p, out / p.name, dirs_exist_ok=True)
                else:
                    shutil.copy2(p, out / p.name)
        elif not isinstance(self._model, (str, os.PathLike)):
            self._model.save_pretrained(out, safe_serialization=True)
            if self.processing_class is not None and hasattr(self.processing_class, "save_pretrained"):
                self.processing_class.save_pretrained(out)
        else:
            raise RuntimeError("nothing to save: train() has not run and the model was given as an id/path")
        return str(out)

    def push_to_hub(
        self, commit_message: str | None = "End of training", blocking: bool = True, token=None, revision=None, **kw
    ) -> dict:
        """The trained model (the run's model directory: weights, or the LoRA adapter and the merged model;
        tokenizer; model card) to the Hub repo `args.hub_model_id` (default: the name of `output_dir`), as
        transformers' Trainer.push_to_hub. Token: `token`, `args.hub_token`, else `$HF_TOKEN`. Trainer's model-card
        keywords (`dataset_name`, `tags`, ...) are accepted; bco-ray's model card comes from the run."""
        if self.result is None:
            raise RuntimeError("push_to_hub() pushes the trained model: call train() first")
        message = commit_message or "End of training"
        return _hub.push(self.args, self.config, self.result.model_dir, message, token, revision)

    # ---------------------------------------------------------------------------------- evaluation
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """BCO eval metrics of the trained model, computed on this (driver) process, no DeepSpeed: loss,
        rewards/*, logps/*, accuracy and AUC of the reward margin r − δ, with the run's final δ.

        With no argument it scores the run's precomputed eval split (the one trained with): the numbers equal the
        run's final `eval/*` metrics. A new `eval_dataset` is tokenized, scored by the reference model and
        weighted by the run's UDM classifier here, then evaluated the same way."""
        if self.result is None:
            raise RuntimeError(
                "evaluate() scores the trained model with the run's δ and UDM classifier: call train() first"
            )
        if eval_dataset is None and self.eval_dataset is None:
            raise ValueError("no eval_dataset: pass one to evaluate() or to BCOTrainer")
        t0 = time.time()
        raw = self.result.raw
        table = _evaluate.eval_table(self.config, raw.paths, raw.precompute_dir, eval_dataset)
        batch = self.args.per_device_eval_batch_size
        m = _evaluate.score(self.model, table, self.config, raw.paths.pad_id, raw.final["delta"], batch)
        out = {f"{metric_key_prefix}_{k.split('/', 1)[1]}": float(v) for k, v in m.items()}
        out[f"{metric_key_prefix}_runtime"] = round(time.time() - t0, 3)
        out[f"{metric_key_prefix}_samples"] = table.num_rows
        return out


# ============================================================================================ helpers


def _checked_args(
    model, args, train_dataset, model_init, optimizers, embedding_func, embedding_tokenizer, processing_class, ignored
) -> BCOConfig:
    """BCOTrainer's arguments checked as TRL's call shape allows them; the BCOConfig to use."""
    if model_init is not None:
        raise NotImplementedError(
            "BCOTrainer(model_init=...) is not supported: pass model (an object, a hub id or a local directory)"
        )
    if model is None:
        raise ValueError("BCOTrainer needs a model (an object, a hub id or a local directory)")
    if train_dataset is None:
        raise ValueError("BCOTrainer needs a train_dataset")
    if args is None:
        args = BCOConfig()
    if not isinstance(args, BCOConfig):
        raise TypeError(f"args must be a bco_ray.BCOConfig, got {type(args).__name__}")
    for name, value in ignored.items():
        if value is not None:
            warnings.warn(
                f"BCOTrainer({name}=...) has no effect in bco-ray: the Ray workers run their own "
                "collation, loop and metrics",
                BCOConfigWarning,
                stacklevel=3,
            )
    if optimizers is not None and any(o is not None for o in optimizers):
        warnings.warn(
            "BCOTrainer(optimizers=...) has no effect in bco-ray: each worker builds DeepSpeed's AdamW "
            "and the lr_scheduler_type schedule",
            BCOConfigWarning,
            stacklevel=3,
        )
    if (embedding_func is None) != (embedding_tokenizer is None):
        raise ValueError("UDM needs both embedding_func and embedding_tokenizer (as in TRL)")
    if _is_peft_model(model):
        raise ValueError(
            "pass the base model and peft_config=LoraConfig(...) instead of a PeftModel: the "
            "workers apply LoRA themselves"
        )
    if not isinstance(model, (str, os.PathLike)) and processing_class is None:
        raise ValueError("processing_class (the tokenizer) must be given with an in-memory model")
    return args
