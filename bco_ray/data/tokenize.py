"""Tokenization of (prompt, completion) rows as in TRL's BCOTrainer (trl 1.13), minus its bugs.

A row becomes ``input_ids = [bos] + prompt + completion + [eos]`` (BOS/EOS added only when the
tokenizer has them and the text does not already start/end with them) and ``prompt_len``; the
completion log-prob is the sum of log p(input_ids[t] | input_ids[:t]) for t >= prompt_len.
Differences from the reference: the completion is truncated to the real remaining budget
(not ``max_length - max_prompt_length``), BOS/EOS are not counted or added when the tokenizer
has none, and sequences never exceed ``max_length``.
"""

from __future__ import annotations

from typing import Any

EMPTY = "empty_completion"
EMPTY_AFTER_TRUNCATION = "empty_completion_after_truncation"
NO_CHAT_TEMPLATE = (
    "tokenizer has no chat template; conversational data needs one: set model.tokenizer to a "
    "tokenizer with a chat template or use plain-text prompt/completion"
)


class EmptyCompletion(ValueError):
    """The completion has no tokens left; the row is dropped and counted under ``reason``."""

    def __init__(self, message: str = "completion empty after truncation", *, reason: str = EMPTY_AFTER_TRUNCATION):
        super().__init__(message)
        self.reason = reason


def check_lengths(max_length: int, max_prompt_length: int) -> None:
    """Raise ValueError unless 0 < max_prompt_length < max_length."""
    if not (isinstance(max_length, int) and isinstance(max_prompt_length, int) and 0 < max_prompt_length < max_length):
        raise ValueError(
            f"need 0 < max_prompt_length < max_length, got max_prompt_length={max_prompt_length!r}"
            f" and max_length={max_length!r}: lower max_prompt_length or raise max_length so the "
            "completion keeps at least one token"
        )


def _messages(value: Any) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in value]


def render(tokenizer: Any, prompt: Any, completion: Any) -> tuple[str, str]:
    """(prompt_text, completion_text): strings unchanged, conversations via the chat template."""
    if isinstance(prompt, str) and isinstance(completion, str):
        return prompt, completion
    if isinstance(prompt, str) or isinstance(completion, str):
        raise ValueError(
            "prompt and completion must both be strings or both lists of messages, "
            f"got {type(prompt).__name__} and {type(completion).__name__}"
        )
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(NO_CHAT_TEMPLATE)
    prompt, completion = _messages(prompt), _messages(completion)
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    if not full.startswith(prompt_text):
        raise ValueError(
            "the chat template renders prompt + completion so that it does not start with the "
            "rendered prompt (with add_generation_prompt=True), so the completion cannot be "
            f"separated: prompt renders as {prompt_text[-80:]!r}, the full conversation as "
            f"{full[: len(prompt_text)][-80:]!r}...; use a chat template whose generation prompt "
            "matches how assistant turns are rendered, or plain-text prompt/completion"
        )
    return prompt_text, full[len(prompt_text) :]


def needs_bos(ids: list[int], bos: int | None) -> bool:
    """The one BOS rule: token ids get the tokenizer's BOS in front unless it has none or they start with it."""
    return bos is not None and (not ids or ids[0] != bos)


def with_bos(ids: list[int], bos: int | None) -> list[int]:
    return [bos] + list(ids) if needs_bos(ids, bos) else list(ids)


def _build(
    p: list[int], f: list[int], *, bos: int | None, eos: int | None, max_length: int, max_prompt_length: int
) -> tuple[list[int], list[int], int]:
    """From the prompt's and the full text's ids, return (prompt_ids, input_ids, prompt_len)."""
    p, f = list(p), list(f)
    r = len(p)
    if f[:r] != p:  # a merge across the boundary changed the last prompt token
        r -= 1
    r = max(r, 0)
    prompt, answer = f[:r], f[r:]
    if not answer:
        raise EmptyCompletion("completion is empty after tokenization", reason=EMPTY)

    needs_eos = eos is not None and answer[-1] != eos
    if len(prompt) + len(answer) + needs_bos(prompt, bos) + needs_eos > max_length:
        prompt = prompt[-max_prompt_length:]  # keep the end of the prompt
        room = max_length - len(prompt) - needs_bos(prompt, bos)
        if len(answer) + needs_eos > room:  # then cut the completion from the right
            answer = answer[: max(room - (eos is not None), 0)]
            if not answer:
                raise EmptyCompletion()
    prompt = with_bos(prompt, bos)
    input_ids = prompt + answer
    if eos is not None and answer[-1] != eos:
        input_ids.append(eos)
    return prompt, input_ids, len(prompt)


def tokenize_pair(
    tokenizer: Any, prompt: str, completion: str, *, max_length: int = 1024, max_prompt_length: int = 512
) -> dict:
    """Tokenize one plain-text pair: {"prompt_ids", "input_ids", "prompt_len"}.

    Raises EmptyCompletion when no completion token is left."""
    check_lengths(max_length, max_prompt_length)
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    f = tokenizer(prompt + completion, add_special_tokens=False)["input_ids"]
    prompt_ids, input_ids, prompt_len = _build(
        p,
        f,
        bos=tokenizer.bos_token_id,
        eos=tokenizer.eos_token_id,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
    )
    return {"prompt_ids": prompt_ids, "input_ids": input_ids, "prompt_len": prompt_len}


def tokenize_batch(
    tokenizer: Any, rows: dict[str, list], *, max_length: int, max_prompt_length: int
) -> tuple[dict[str, list], dict[str, int]]:
    """Columnar tokenize_pair over prompt/completion/label columns (strings or conversations).

    Returns (columns prompt_ids, input_ids, prompt_len, label, prompt_text; dropped-row counts
    by reason). Rows whose completion ends up empty are dropped and counted."""
    check_lengths(max_length, max_prompt_length)
    rendered = [render(tokenizer, p, c) for p, c in zip(rows["prompt"], rows["completion"])]
    out: dict[str, list] = {k: [] for k in ("prompt_ids", "input_ids", "prompt_len", "label", "prompt_text")}
    dropped = {EMPTY: 0, EMPTY_AFTER_TRUNCATION: 0}
    if not rendered:
        return out, dropped
    p_ids = tokenizer([p for p, _ in rendered], add_special_tokens=False)["input_ids"]
    f_ids = tokenizer([p + c for p, c in rendered], add_special_tokens=False)["input_ids"]
    for (prompt_text, _), p, f, label in zip(rendered, p_ids, f_ids, rows["label"]):
        try:
            prompt_ids, input_ids, prompt_len = _build(
                p,
                f,
                bos=tokenizer.bos_token_id,
                eos=tokenizer.eos_token_id,
                max_length=max_length,
                max_prompt_length=max_prompt_length,
            )
        except EmptyCompletion as e:
            dropped[e.reason] += 1
            continue
        out["prompt_ids"].append(prompt_ids)
        out["input_ids"].append(input_ids)
        out["prompt_len"].append(prompt_len)
        out["label"].append(bool(label))
        out["prompt_text"].append(prompt_text)
    return out, dropped
