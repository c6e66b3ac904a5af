"""Tests for bco_ray.data.tokenize: chat rendering, boundary merges, BOS/EOS and truncation."""

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from bco_ray.data.tokenize import EmptyCompletion, render, tokenize_batch, tokenize_pair

# Character-level BPE with a single merge a+b -> "ab": hand-computable ids.
VOCAB = {
    "<unk>": 0,
    "<s>": 1,
    "</s>": 2,
    "<pad>": 3,
    " ": 4,
    "a": 5,
    "b": 6,
    "c": 7,
    "d": 8,
    "e": 9,
    "f": 10,
    "g": 11,
    "h": 12,
    "ab": 13,
}
# user turns start with "g", assistant turns with "h"; the generation prompt is "h".
TEMPLATE = (
    "{% for m in messages %}{{ 'g' if m['role'] == 'user' else 'h' }}{{ m['content'] }} "
    "{% endfor %}{% if add_generation_prompt %}h{% endif %}"
)
BUNDLED = Path(__file__).resolve().parents[1] / "bco_ray" / "assets" / "tokenizer"


def make_tokenizer(bos=True, chat_template=None):
    tok = Tokenizer(models.BPE(vocab=dict(VOCAB), merges=[("a", "b")], unk_token="<unk>"))
    kwargs = {"bos_token": "<s>"} if bos else {}
    t = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", **kwargs)
    if chat_template:
        t.chat_template = chat_template
    return t


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


# ----------------------------------------------------------------------------- render


def test_render_plain_text_unchanged(tok):
    assert render(tok, "gcd ", "hef") == ("gcd ", "hef")


def test_render_conversational_with_template():
    t = make_tokenizer(chat_template=TEMPLATE)
    prompt = msgs(("user", "cd"))
    assert render(t, prompt, msgs(("assistant", "ef"))) == ("gcd h", "ef ")
    multi = msgs(("user", "a"), ("assistant", "b"), ("user", "c"))
    assert render(t, multi, msgs(("assistant", "d"))) == ("ga hb gc h", "d ")


def test_render_without_chat_template_is_clear(tok):
    with pytest.raises(
        ValueError, match="tokenizer has no chat template; conversational data needs one: set model.tokenizer"
    ):
        render(tok, msgs(("user", "cd")), msgs(("assistant", "ef")))


def test_render_errors():
    t = make_tokenizer(chat_template=TEMPLATE.replace("}h{", "}e{"))  # inconsistent template
    with pytest.raises(ValueError, match="does not start with the rendered prompt"):
        render(t, msgs(("user", "cd")), msgs(("assistant", "ef")))
    with pytest.raises(ValueError, match="must both be strings or both lists"):
        render(t, "cd", msgs(("assistant", "ef")))


# ----------------------------------------------------------------------------- tokenize_pair


def test_bos_eos_added_once(tok):
    out = tokenize_pair(tok, "cd", "ef")
    assert out == {"prompt_ids": [1, 7, 8], "input_ids": [1, 7, 8, 9, 10, 2], "prompt_len": 3}
    # text that already starts with BOS / ends with EOS is not doubled
    out = tokenize_pair(tok, "<s>cd", "ef</s>")
    assert out == {"prompt_ids": [1, 7, 8], "input_ids": [1, 7, 8, 9, 10, 2], "prompt_len": 3}


def test_no_bos_tokenizer():
    t = make_tokenizer(bos=False)
    assert t.bos_token_id is None
    out = tokenize_pair(t, "cd", "ef")
    assert out == {"prompt_ids": [7, 8], "input_ids": [7, 8, 9, 10, 2], "prompt_len": 2}
    # without BOS only one slot is reserved (EOS): 2 + 3 + 1 = 6 fits exactly
    out = tokenize_pair(t, "cd", "efg", max_length=6, max_prompt_length=2)
    assert out["input_ids"] == [7, 8, 9, 10, 11, 2]


def test_bpe_merge_across_boundary(tok):
    # "ca" -> [c, a]; "cabd" -> [c, ab, d]: the last prompt token merges into the completion
    assert tok("ca", add_special_tokens=False)["input_ids"] == [7, 5]
    assert tok("cabd", add_special_tokens=False)["input_ids"] == [7, 13, 8]
    out = tokenize_pair(tok, "ca", "bd")
    assert out["prompt_len"] == 2  # BOS + "c": one less than BOS + len([c, a])
    assert out["prompt_ids"] == [1, 7]
    assert out["input_ids"] == [1, 7, 13, 8, 2]  # the full string's ids, not prompt + completion


def test_truncation_prompt_from_end_then_completion(tok):
    # prompt cdefgh = [7..12] (6), completion hgfe = [12, 11, 10, 9] (4): 1 + 6 + 4 + 1 = 12
    assert tokenize_pair(tok, "cdefgh", "hgfe", max_length=12, max_prompt_length=3)["input_ids"] == [
        1,
        7,
        8,
        9,
        10,
        11,
        12,
        12,
        11,
        10,
        9,
        2,
    ]
    # prompt cut to its last 4 tokens is enough
    out = tokenize_pair(tok, "cdefgh", "hgfe", max_length=10, max_prompt_length=4)
    assert out["input_ids"] == [1, 9, 10, 11, 12, 12, 11, 10, 9, 2]
    assert out["prompt_len"] == 5 and len(out["input_ids"]) == 10
    # prompt cut to 3, then the completion is cut from the right to the remaining budget
    out = tokenize_pair(tok, "cdefgh", "hgfe", max_length=8, max_prompt_length=3)
    assert out == {"prompt_ids": [1, 10, 11, 12], "input_ids": [1, 10, 11, 12, 12, 11, 10, 2], "prompt_len": 4}


def test_truncated_completion_that_ended_with_eos_still_fits(tok):
    # the completion's own EOS is cut away, so a new EOS is appended: still max_length
    out = tokenize_pair(tok, "cd", "hgfe</s>", max_length=5, max_prompt_length=2)
    assert out["input_ids"] == [1, 7, 8, 12, 2]


def test_empty_completion_after_truncation(tok):
    with pytest.raises(EmptyCompletion, match="completion empty after truncation") as e:
        tokenize_pair(tok, "cdefgh", "hgfe", max_length=5, max_prompt_length=4)
    assert e.value.reason == "empty_completion_after_truncation"
    with pytest.raises(EmptyCompletion) as e:
        tokenize_pair(tok, "cd", "")
    assert e.value.reason == "empty_completion"


@pytest.mark.parametrize("max_length,max_prompt_length", [(8, 8), (8, 9), (8, 0)])
def test_bad_lengths(tok, max_length, max_prompt_length):
    with pytest.raises(ValueError, match="need 0 < max_prompt_length < max_length"):
        tokenize_pair(tok, "cd", "ef", max_length=max_length, max_prompt_length=max_prompt_length)


# ----------------------------------------------------------------------------- tokenize_batch


def test_tokenize_batch_matches_pairs_and_counts_drops():
    t = make_tokenizer(chat_template=TEMPLATE)
    rows = {
        "prompt": ["cd", "ca", msgs(("user", "cd")), "cd"],
        "completion": ["ef", "bd", msgs(("assistant", "ef")), ""],
        "label": [True, 0, np.bool_(True), 1],
    }
    out, dropped = tokenize_batch(t, rows, max_length=8, max_prompt_length=4)
    assert dropped == {"empty_completion": 1, "empty_completion_after_truncation": 0}
    assert out["label"] == [True, False, True] and type(out["label"][2]) is bool
    assert out["prompt_text"] == ["cd", "ca", "gcd h"]
    # conversational: "gcd h" = [g, c, d, " ", h] cut to its last 4, "ef " = [e, f, " "] to 2
    assert out["input_ids"] == [[1, 7, 8, 9, 10, 2], [1, 7, 13, 8, 2], [1, 7, 8, 4, 12, 9, 10, 2]]
    assert out["prompt_len"] == [3, 2, 5]
    assert out["prompt_ids"] == [[1, 7, 8], [1, 7], [1, 7, 8, 4, 12]]
    for i, (p, c) in enumerate([("cd", "ef"), ("ca", "bd")]):
        pair = tokenize_pair(t, p, c, max_length=8, max_prompt_length=4)
        assert [out[k][i] for k in pair] == list(pair.values())
    rows = {"prompt": ["cdefgh", "cd"], "completion": ["hgfe", "ef"], "label": [1, 0]}
    out, dropped = tokenize_batch(t, rows, max_length=5, max_prompt_length=4)
    assert dropped == {"empty_completion": 0, "empty_completion_after_truncation": 1}
    assert out["input_ids"] == [[1, 7, 8, 9, 2]] and out["label"] == [False]


def test_tokenize_batch_numpy_columns_and_empty():
    t = make_tokenizer(bos=False)
    rows = {
        "prompt": np.array(["cd"], dtype=object),
        "completion": np.array(["ef"], dtype=object),
        "label": np.array([True]),
    }
    out, _ = tokenize_batch(t, rows, max_length=8, max_prompt_length=4)
    assert out["input_ids"] == [[7, 8, 9, 10, 2]] and out["prompt_len"] == [2]
    out, dropped = tokenize_batch(t, {"prompt": [], "completion": [], "label": []}, max_length=8, max_prompt_length=4)
    assert out["input_ids"] == [] and sum(dropped.values()) == 0


@pytest.mark.skipif(not (BUNDLED / "tokenizer.json").exists(), reason="no bundled tokenizer")
def test_bundled_tokenizer_round_trip():
    t = AutoTokenizer.from_pretrained(str(BUNDLED))
    rows = {"prompt": [msgs(("user", "What is 2+3?"))], "completion": [msgs(("assistant", "5"))], "label": [True]}
    out, _ = tokenize_batch(t, rows, max_length=64, max_prompt_length=32)
    ids, n = out["input_ids"][0], out["prompt_len"][0]
    assert t.decode(ids[:n]) == (t.bos_token or "") + out["prompt_text"][0]
    assert t.decode(ids[n:]).startswith("5<|im_end|>") and ids[-1] == t.eos_token_id
    assert ids.count(t.eos_token_id) == 1
