"""Build the bundled byte-level BPE tokenizer (deterministic, offline).

Trains on the bundled arithmetic train/eval text plus a small English text, and
writes tokenizer.json, tokenizer_config.json and special_tokens_map.json into
bco_ray/assets/tokenizer/, loadable with ``AutoTokenizer.from_pretrained(<that dir>)``:
    python tools/build_tokenizer.py
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

HERE = Path(__file__).resolve().parents[1] / "bco_ray" / "assets" / "tokenizer"  # where it writes
DATA = HERE.parent / "arithmetic"
VOCAB_SIZE = 512  # including the special tokens
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]  # ids 0..4
# Qwen2's split regex (digits are single tokens).  Using exactly the normalizer and
# pre-tokenizer of transformers' Qwen2Tokenizer matters: with transformers 5,
# AutoTokenizer on a directory whose config.json says model_type "qwen2" builds a
# Qwen2Tokenizer from our vocab/merges with *its* pre-tokenizer, ignoring ours.
SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

ENGLISH = """\
The quick brown fox jumps over the lazy dog. This is a small language model
that learns to answer simple questions about numbers. It should be helpful,
honest and short. When a user asks a question, the assistant gives the answer
and nothing else.

People like to give a thumbs up when an answer is right and a thumbs down when
it is wrong. We use that feedback to train the model: good answers become more
likely and bad answers become less likely. A classifier learns to tell them
apart, and the reward is its logit.

You are a helpful assistant. Please think about the problem, then write the
final result. The weather is nice today, so we will go for a walk in the park
with our friends. What time is it? It is ten past three in the afternoon.
Thank you very much for your help; I would like to know more about this.
"""


def corpus() -> list[str]:
    texts = [ENGLISH]
    for split in ("train", "eval"):
        with open(DATA / f"{split}.jsonl", encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                texts.append(row["prompt"] + row["completion"])
    return texts


def build() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    # No post-processor: special tokens are never added implicitly.
    return tok


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main() -> None:
    tok = build()
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    tok.save(str(HERE / "tokenizer.json"), pretty=True)
    special = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
    }
    write_json(HERE / "special_tokens_map.json", special)
    write_json(
        HERE / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "unk_token": None,  # byte-level: no unknowns (and no Qwen2 "<|endoftext|>" default)
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 2048,
            "padding_side": "right",
            "chat_template": CHAT_TEMPLATE,
        },
    )


if __name__ == "__main__":
    main()
