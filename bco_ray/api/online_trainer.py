"""`OnlineBCOTrainer`: trl 1.13's online trainers' call shape (OnlineDPOTrainer's argument order, GRPOTrainer's
`reward_funcs`), backed by the online job (`bco_ray.job.online.run_online`) run in this process.

    trainer = OnlineBCOTrainer(model, ref_model=None, reward_funcs=[accuracy], args=OnlineBCOConfig(...),
                               train_dataset=prompts, processing_class=tokenizer)
    trainer.train()

The reward functions label on this (driver) process: they are called in-process, never imported by name nor
shipped to the workers (bco_ray/online/rewards.py: the per-sample and TRL batch contracts, summed and
thresholded). The model, reference and tokenizer are saved under `inputs_dir` content-addressed, as BCOTrainer
saves them; the prompts go there as Parquet. After train() the model object passed holds the trained weights."""

from __future__ import annotations

import os
import time
import warnings
from typing import Any

import datasets

from bco_ray.api._io import _as_dataset
from bco_ray.api.config import BCOConfigWarning
from bco_ray.api.online_config import OnlineBCOConfig
from bco_ray.api.trainer import BCOTrainer, BCOTrainOutput, _checked_args
from bco_ray.config.schema import Config
from bco_ray.job.online import run_online
from bco_ray.online.rewards import RewardLabel


class OnlineBCOTrainer(BCOTrainer):
    """trl 1.13's `OnlineDPOTrainer` signature; `train()` runs the online BCO job (rounds of generate → label by
    `reward_funcs` → BCO update) on Ray from this process.

    `reward_funcs`: a function or a list of them, each `f(prompt, completion) -> bool | number | dict` (bco-ray's
    labeler contract) or TRL's `f(prompts, completions, **kwargs) -> list[float | None]` (any function with a
    `completions` parameter; the kwargs are the prompt's other dataset columns, as lists). Several are summed
    with `args.reward_weights`; a sample is desirable iff its reward >= `args.threshold` (one function's bool is
    the label itself). `train_dataset`: prompts, a `datasets.Dataset` / list of dicts / DataFrame with a text
    "prompt" column (other columns go to the reward functions), or a data spec. `ref_model=None`: the model's
    initial weights. Reward models (`str` / `nn.Module` reward_funcs), `eval_dataset` and `peft_config` are not
    supported (an error says so)."""

    def __init__(
        self,
        model=None,
        ref_model=None,
        reward_funcs=None,
        args: OnlineBCOConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        peft_config=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        preprocess_logits_for_metrics=None,
    ):
        args = OnlineBCOConfig() if args is None else args
        if not isinstance(args, OnlineBCOConfig):
            raise TypeError(f"args must be a bco_ray.OnlineBCOConfig, got {type(args).__name__}")
        if reward_funcs is None:
            raise ValueError("OnlineBCOTrainer needs reward_funcs (a function or a list of functions)")
        if ref_model is not None and ref_model is model:
            raise ValueError(
                "model and ref_model cannot be the same object (as in trl): omit ref_model to use the model's "
                "initial weights as the reference"
            )
        if eval_dataset is not None:
            raise ValueError(
                "OnlineBCOTrainer(eval_dataset=...) is not supported: the held-out generation eval takes a "
                "verifier by name; set it with args.bco_ray_overrides={'eval.generate': True, 'eval.verifier': "
                "'package.module:function', 'data.eval': <data with a prompt column>}"
            )
        if peft_config is not None:
            raise NotImplementedError("OnlineBCOTrainer(peft_config=...) is not supported yet: train the full model")
        ignored = {
            "data_collator": data_collator,
            "reward_processing_classes": reward_processing_classes,
            "compute_metrics": compute_metrics,
            "callbacks": callbacks,
            "preprocess_logits_for_metrics": preprocess_logits_for_metrics,
        }
        _checked_args(model, args, train_dataset, None, optimizers, None, None, processing_class, ignored)
        funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        self.reward_funcs = funcs
        self._train_prompts = train_dataset
        self._prompts, columns = _prompts(train_dataset)
        self.labeler = RewardLabel(funcs, args.reward_weights, columns)
        super().__init__(model, ref_model, args, train_dataset, None, processing_class)

    def _build_config(self) -> Config:
        a: OnlineBCOConfig = self.args
        n = None if self._prompts is None else len(self._prompts)
        a.to_config(n)  # a bad setting fails here, before anything is saved
        model: dict[str, Any] = {"policy": self._model_spec(self._model), "reference": None, "tokenizer": None}
        if self.ref_model is not None:
            ref = self._model_spec(self.ref_model)
            model["reference"] = None if ref == model["policy"] else ref
        if self.processing_class is not None:
            model["tokenizer"] = self._tokenizer_spec(self.processing_class)
        ds = self._train_prompts
        if self._prompts is not None:  # the distinct prompts only: the other columns stay here, for the rewards
            ds = datasets.Dataset.from_dict({"prompt": self._prompts})
        prompts = self._data_spec(ds, "prompts")
        return a.to_config(n, model=model, online={"prompts": prompts})

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs) -> BCOTrainOutput:
        """Run the online job (bco_ray.job.online.run_online) in this process; the reward functions label here.
        Blocks until it finishes; the model object passed gets the trained weights. An unfinished run with the
        same run_name resumes where it stopped."""
        if resume_from_checkpoint:
            warnings.warn(
                "train(resume_from_checkpoint=...) is not needed: an unfinished run resumes when it is started "
                "again with the same run_name",
                BCOConfigWarning,
                stacklevel=2,
            )
        cfg = self.config
        if self.args.use_gpu is None and not self.args.use_cpu:
            cfg = self._auto_gpu(cfg)
        t0 = time.time()
        res = run_online(cfg, labeler=self.labeler)
        self.result = self._train_output(res, time.time() - t0)
        self._state = self._trainer_state(cfg)
        self._trained_model = None
        if not isinstance(self._model, (str, os.PathLike)):
            self._update_in_memory_model()
        return self.result

    def evaluate(self, *args, **kwargs):
        raise NotImplementedError(
            "OnlineBCOTrainer.evaluate() is not supported: the online run logs each round's pass rate "
            "(online/pass_rate in trainer.state.log_history) and, with eval.generate, the held-out eval"
        )


def _prompts(ds) -> tuple[list[str] | None, dict[str, dict[str, Any]]]:
    """The distinct prompts of an in-memory dataset and each one's other columns (the first row's, for the
    reward functions); (None, {}) for a data spec (a path, a URI, hf:...), read by the job."""
    if isinstance(ds, (str, os.PathLike)):
        return None, {}
    table = _as_dataset(ds, "train")
    if "prompt" not in table.column_names:
        raise ValueError(
            f"train_dataset has no 'prompt' column (columns: {table.column_names}): OnlineBCOTrainer samples "
            "completions of its prompts"
        )
    columns: dict[str, dict[str, Any]] = {}
    for i, row in enumerate(table):
        p = row.pop("prompt")
        if not isinstance(p, str) or not p.strip():
            kind = "a conversation" if isinstance(p, list) else repr(p)[:80]
            raise ValueError(
                f"train_dataset row {i}: the prompt is {kind}; the online job samples text prompts (apply the "
                "tokenizer's chat template to conversational prompts first)"
            )
        columns.setdefault(p, row)
    return list(columns), columns
