"""A TRL BCO script in the shape of TRL's `examples/scripts/bco.py` (our own version, for the tests), with only
the BCO import changed: `from trl.experimental.bco import BCOConfig, BCOTrainer` → `from bco_ray import ...`.

trl is not installed here, so `ScriptArguments`, `ModelConfig` and `get_peft_config` are small stand-ins with
trl's field names, defaults and behaviour (a one-item `--lora_target_modules` list becomes its item, as trl's
ModelConfig does). UDM (the embedding model) is optional here, to keep the test runs small.

    python bco.py --model_name_or_path <model> --dataset_name <dir with train.jsonl / test.jsonl> \
        --output_dir out --per_device_train_batch_size 8 --eval_strategy steps --eval_steps 0.5 \
        --save_strategy no --logging_first_step --max_length 256 --max_completion_length 128 \
        --no_remove_unused_columns --warmup_steps 0.1 --use_peft --lora_target_modules all-linear
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from accelerate import Accelerator
from datasets import load_dataset
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

from bco_ray import BCOConfig, BCOTrainer  # was: from trl.experimental.bco import BCOConfig, BCOTrainer


@dataclass
class ScriptArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "Dataset (a hub id or a local directory)."})
    dataset_train_split: str = "train"
    dataset_test_split: str = "test"
    embedding_model: str | None = field(default=None, metadata={"help": "UDM: the prompts' embedding model."})


@dataclass
class ModelConfig:
    model_name_or_path: str | None = None
    use_peft: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = None
    lora_task_type: str = "CAUSAL_LM"

    def __post_init__(self):
        if self.lora_target_modules is not None and len(self.lora_target_modules) == 1:
            self.lora_target_modules = self.lora_target_modules[0]


def get_peft_config(model_args: ModelConfig):
    if not model_args.use_peft:
        return None
    from peft import LoraConfig

    return LoraConfig(
        task_type=model_args.lora_task_type,
        r=model_args.lora_r,
        target_modules=model_args.lora_target_modules,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        bias="none",
    )


def embed_prompt(input_ids, attention_mask, model):
    embeddings = model(input_ids=input_ids, attention_mask=attention_mask)
    return embeddings.last_hidden_state.mean(dim=1)


def main(argv: list[str] | None = None):
    parser = HfArgumentParser((ScriptArguments, BCOConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_into_dataclasses(argv)
    training_args.gradient_checkpointing_kwargs = {"use_reentrant": True}

    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
    ref_model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    dataset = load_dataset(script_args.dataset_name)

    embedding_func = embedding_tokenizer = None
    if script_args.embedding_model:
        accelerator = Accelerator()
        embedding_model = AutoModel.from_pretrained(script_args.embedding_model, dtype=torch.bfloat16)
        embedding_model = accelerator.prepare_model(embedding_model)
        embedding_tokenizer = AutoTokenizer.from_pretrained(script_args.embedding_model)
        embedding_func = partial(embed_prompt, model=embedding_model)

    trainer = BCOTrainer(
        model,
        ref_model,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        embedding_func=embedding_func,
        embedding_tokenizer=embedding_tokenizer,
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return trainer


if __name__ == "__main__":
    main()
