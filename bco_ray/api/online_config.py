"""`OnlineBCOConfig`: BCOConfig's fields (TRL's BCOConfig and transformers' TrainingArguments, mapped as for
offline BCO) plus the generation fields of trl 1.13's GRPOConfig, mapped onto the online job's `online.*` section.

How a GRPO run's shape becomes rounds (trl 1.13's GRPOConfig.__post_init__): a generation batch of
`generation_batch_size` completions (default `per_device_train_batch_size × num_workers × steps_per_generation`,
`steps_per_generation` defaulting to `gradient_accumulation_steps`: one optimizer step per generation) is
`generation_batch_size / num_generations` prompts × `num_generations` samples: one online round
(`online.prompts_per_round` × `online.samples_per_prompt`). `max_steps` (optimizer steps) or `num_train_epochs`
(passes over the prompts) give the number of rounds; the bco-ray extras `prompts_per_round` and `rounds` set them
directly."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from bco_ray.api._mapping import _to_config
from bco_ray.api.config import BCOConfig
from bco_ray.config.schema import ConfigError
from bco_ray.online.rewards import IN_PROCESS

# OnlineBCOConfig's own fields: field -> (bco-ray config field(s) it sets; note). Read by docs/trl_migration.md.
ONLINE_ROUTES: dict[str, tuple[str, str]] = {
    "num_generations": ("online.samples_per_prompt", "GRPOConfig's: completions sampled per prompt each round"),
    "temperature": ("online.temperature", ""),
    "top_p": ("online.top_p", ""),
    "max_completion_length": ("online.max_new_tokens", "tokens generated per completion"),
    "generation_batch_size": (
        "online.prompts_per_round",
        "completions a round (÷ num_generations: prompts a round); default: one optimizer step's rows",
    ),
    "steps_per_generation": ("online.prompts_per_round", "micro-steps a round (trl: gradient_accumulation_steps)"),
    "reward_weights": ("", "one weight per reward function; the weighted sum is compared with `threshold`"),
    "max_steps": ("online.rounds", "optimizer steps: rounds = ⌈max_steps × global batch ÷ rows a round⌉"),
    "num_train_epochs": ("online.rounds", "passes over the prompts: rounds = ⌈epochs × prompts ÷ prompts a round⌉"),
    # bco-ray extras
    "prompts_per_round": ("online.prompts_per_round", "wins over generation_batch_size / steps_per_generation"),
    "rounds": ("online.rounds", "wins over max_steps / num_train_epochs"),
    "threshold": ("online.threshold", "a reward >= threshold is desirable"),
    "on_label_error": ("online.on_label_error", '"error" or "skip" a sample whose reward function raises'),
    "replay_rounds": ("online.replay_rounds", "each update also trains on this many previous rounds' rows"),
    "undesirable_weight": ("online.undesirable_weight", "scales the undesirable rows' loss (KTOConfig's name)"),
    "rollout_cpus": ("online.rollout_cpus", "CPUs of the rollout actor, beside the training workers"),
}


@dataclass(init=False)
class OnlineBCOConfig(BCOConfig):
    """`BCOConfig` (every field, as for BCOTrainer) plus the generation fields of trl 1.13's GRPOConfig (their
    defaults) and the online job's. Used by `OnlineBCOTrainer`; `to_config(n_prompts=...)` maps it onto bco-ray's
    Config with the `online` section. GRPO's sampling and loss settings with no online-BCO meaning (top_k,
    use_vllm, loss_type, ...) are accepted with a warning when set."""

    mlflow_experiment: str = "bco-ray-online"
    # trl 1.13 GRPOConfig's generation fields
    num_generations: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_completion_length: int | None = 512
    generation_batch_size: int | None = None
    steps_per_generation: int | None = None
    reward_weights: list[float] | None = None
    # accepted, no effect (a warning when set to another value)
    top_k: int = 0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    generation_kwargs: dict | str | None = None
    use_vllm: bool = False
    num_iterations: int = 1
    epsilon: float = 0.2
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    mask_truncated_completions: bool = False
    log_completions: bool = False
    shuffle_dataset: bool | None = True
    # bco-ray's online extras
    prompts_per_round: int | None = None
    rounds: int | None = None
    threshold: float = 0.5
    on_label_error: str = "error"
    replay_rounds: int = 0
    undesirable_weight: float = 1.0
    rollout_cpus: float = 1.0

    _whole_epochs = False  # num_train_epochs gives the rounds (a fraction is fine)

    def _set_but_ignored(self) -> dict[str, Any]:
        return {k: v for k, v in super()._set_but_ignored().items() if k not in ONLINE_ROUTES}

    def _training_fields(self) -> dict[str, Any]:
        f = super()._training_fields()
        f.update({"train.max_steps": -1, "train.num_epochs": 1})  # the rounds set the budget (online.rounds)
        return f

    def prompts_a_round(self) -> int:
        """Prompts each round: `prompts_per_round`, else GRPO's generation batch ÷ num_generations."""
        if self.prompts_per_round is not None:
            return int(self.prompts_per_round)
        micro = self.per_device_train_batch_size * self.num_workers
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ValueError("OnlineBCOConfig: set generation_batch_size or steps_per_generation, not both (as trl)")
        batch = self.generation_batch_size
        if batch is None:
            batch = micro * (self.steps_per_generation or self.gradient_accumulation_steps)
        if batch % self.num_generations:
            raise ValueError(
                f"OnlineBCOConfig: the generation batch of {batch} completions (generation_batch_size, default "
                f"per_device_train_batch_size × num_workers × steps_per_generation) must be divisible by "
                f"num_generations ({self.num_generations}), as in trl; or set prompts_per_round"
            )
        return batch // self.num_generations

    def rounds_for(self, n_prompts: int | None) -> int | None:
        """Rounds: `rounds`, else from `max_steps` (optimizer steps) or `num_train_epochs` over `n_prompts`
        distinct prompts; None when neither says (n_prompts unknown): online.rounds' default."""
        if self.rounds is not None:
            return int(self.rounds)
        rows = self.prompts_a_round() * self.num_generations
        if self.max_steps is not None and self.max_steps > 0:
            global_batch = self.per_device_train_batch_size * self.num_workers * self.gradient_accumulation_steps
            return max(1, math.ceil(self.max_steps * global_batch / rows))
        if n_prompts:
            return max(1, math.ceil(float(self.num_train_epochs) * n_prompts / self.prompts_a_round()))
        return None

    def online_fields(self, n_prompts: int | None = None) -> dict[str, Any]:
        """{bco-ray field: value} of the online section (and the sections the online job needs set)."""
        if self.max_completion_length is None:
            raise ValueError("OnlineBCOConfig.max_completion_length=None: set the tokens generated per completion")
        f: dict[str, Any] = {
            "online.samples_per_prompt": self.num_generations,
            "online.temperature": self.temperature,
            "online.top_p": self.top_p,
            "online.max_new_tokens": self.max_completion_length,
            "online.prompts_per_round": self.prompts_a_round(),
            "online.threshold": self.threshold,
            "online.on_label_error": self.on_label_error,
            "online.replay_rounds": self.replay_rounds,
            "online.undesirable_weight": self.undesirable_weight,
            "online.rollout_cpus": self.rollout_cpus,
            "online.labeler": IN_PROCESS,
            "udm.enabled": False,  # UDM needs an embedding model, which OnlineBCOTrainer does not take
            "eval.generate": False,  # the held-out generation eval takes eval.verifier: bco_ray_overrides
            "data.eval": None,
        }
        rounds = self.rounds_for(n_prompts)
        if rounds is not None:
            f["online.rounds"] = rounds
        return f

    def overrides(self, n_prompts: int | None = None) -> dict:
        """The bco-ray Config fields this config sets, as a nested dict (BCOConfig's, then the online ones)."""
        o = super().overrides()
        for path, value in self.online_fields(n_prompts).items():
            node = o
            *parents, leaf = path.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        return o

    def to_config(self, n_prompts: int | None = None, **sections: dict):
        """The bco-ray Config (validated) of an online run over `n_prompts` distinct prompts (for
        num_train_epochs); `sections` as in BCOConfig.to_config (OnlineBCOTrainer passes the model and prompts)."""
        try:
            return _to_config(self.overrides(n_prompts), sections, self.bco_ray_overrides)
        except ConfigError as e:
            names = sorted({k for k, (to, _) in ONLINE_ROUTES.items() if to and to in str(e)})
            raise ConfigError(f"{e} (OnlineBCOConfig field: {', '.join(names)})" if names else str(e)) from None
