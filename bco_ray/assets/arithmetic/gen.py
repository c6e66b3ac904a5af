"""Deterministic generator for the bundled arithmetic thumbs-up/down dataset.

Writes ``train.jsonl`` and ``eval.jsonl`` next to this file, one
``{"prompt": str, "completion": str, "label": bool}`` object per line, and
``eval_double.jsonl``: the eval rows of the ``double`` family (the online demo's
held-out prompts).
A row is labelled ``true`` iff the number in the completion equals the true
result of the prompt.  The per-family share of correct answers differs on
purpose (addition mostly right, multiplication / multi-step mostly wrong), so
the desirable and undesirable prompt distributions differ: this is the shift
that BCO's UDM density-ratio weighting corrects.

Stdlib only; re-running gives byte-identical files:
    python bco_ray/assets/arithmetic/gen.py
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
N_TRAIN, N_EVAL = 3000, 400
SEED = 1234


def _a_ge_b(a: int, r: random.Random) -> tuple[int, int]:
    return a, r.randint(1, a)


# family -> (share of correct answers, operand sampler, result fn, phrasings)
FAMILIES = {
    "add": (
        0.80,
        lambda r: (r.randint(1, 99), r.randint(1, 99)),
        lambda a, b: a + b,
        ["What is {a} + {b}?", "Compute {a} + {b}.", "Add {a} and {b}.", "What is the sum of {a} and {b}?"],
    ),
    "double": (
        0.75,
        lambda r: (r.randint(2, 499),),
        lambda a: 2 * a,
        ["What is double {a}?", "Double the number {a}.", "What is twice {a}?"],
    ),
    "sub": (
        0.55,
        lambda r: _a_ge_b(r.randint(10, 99), r),
        lambda a, b: a - b,
        ["What is {a} - {b}?", "Subtract {b} from {a}.", "What is {a} minus {b}?"],
    ),
    "max": (
        0.50,
        lambda r: tuple(r.sample(range(1, 200), 2)),
        max,
        ["Which is larger, {a} or {b}?", "What is the max of {a} and {b}?"],
    ),
    "mul": (
        0.20,
        lambda r: (r.randint(3, 19), r.randint(3, 19)),
        lambda a, b: a * b,
        ["What is {a} * {b}?", "Multiply {a} by {b}.", "What is {a} times {b}?"],
    ),
    "hard": (
        0.15,
        lambda r: (r.randint(11, 49), r.randint(3, 19), r.randint(2, 99)),
        lambda a, b, c: a * b + c,
        ["What is {a} * {b} + {c}?", "Multiply {a} by {b}, then add {c}.", "Compute {a} times {b} plus {c}."],
    ),
}
SUFFIX = "\nAnswer:"
COMPLETION_STYLES = [" {n}"] * 6 + [" {n}.", " The answer is {n}."]
# Hedged answers are mostly the wrong ones (as with real feedback, where stated uncertainty tracks errors):
# a completion-level signal a tiny policy can learn, which UDM's prompt-level reweighting leaves intact.
HEDGED_STYLES = [" Maybe {n}?", " I think it is {n}, not sure.", " Probably {n}."]
P_HEDGED = {True: 0.1, False: 0.6}


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for name in "abc":
        pattern = pattern.replace(re.escape(f"{{{name}}}"), rf"(?P<{name}>\d+)")
    return re.compile(pattern + re.escape(SUFFIX))


_PARSERS = [(fam, _template_regex(t)) for fam, spec in FAMILIES.items() for t in spec[3]]


def solve(prompt: str) -> tuple[str, int]:
    """Parse a generated prompt back into ``(family, true_result)``."""
    for fam, rx in _PARSERS:
        m = rx.fullmatch(prompt)
        if m:
            args = [int(m[name]) for name in "abc" if name in rx.groupindex]
            return fam, FAMILIES[fam][2](*args)
    raise ValueError(f"not a generated prompt: {prompt!r}")


def completion_number(completion: str) -> int:
    """The (single) integer stated in a completion."""
    (num,) = re.findall(r"-?\d+", completion)
    return int(num)


def _wrong(r: random.Random, fam: str, args: tuple, truth: int) -> int:
    if fam == "max":
        return min(args)  # the classic mistake
    while True:
        cand = truth + r.choice([-1, 1]) * r.choice([1, 1, 2, 3, 5, 10, r.randint(4, 30)])
        if cand != truth and cand >= 0:
            return cand


def make_row(r: random.Random, fam: str) -> dict:
    p_true, sample, fn, phrasings = FAMILIES[fam]
    args = sample(r)
    names = dict(zip("abc", args))
    prompt = r.choice(phrasings).format(**names) + SUFFIX
    truth = fn(*args)
    label = r.random() < p_true
    n = truth if label else _wrong(r, fam, args, truth)
    styles = HEDGED_STYLES if r.random() < P_HEDGED[label] else COMPLETION_STYLES
    return {"prompt": prompt, "completion": r.choice(styles).format(n=n), "label": label}


def generate(n: int, r: random.Random, seen: set[str]) -> list[dict]:
    rows, fams = [], list(FAMILIES)
    while len(rows) < n:
        row = make_row(r, fams[len(rows) % len(fams)])
        if row["prompt"] in seen:  # no duplicate prompts, no train/eval leakage
            continue
        seen.add(row["prompt"])
        rows.append(row)
    r.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    r, seen = random.Random(SEED), set()
    write_jsonl(HERE / "train.jsonl", generate(N_TRAIN, r, seen))
    eval_rows = generate(N_EVAL, r, seen)
    write_jsonl(HERE / "eval.jsonl", eval_rows)
    write_jsonl(HERE / "eval_double.jsonl", [row for row in eval_rows if solve(row["prompt"])[0] == "double"])


if __name__ == "__main__":
    main()
