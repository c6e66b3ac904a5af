"""A single-process, plain-torch simulation of online BCO on the bundled arithmetic task (no Ray, no DeepSpeed):
the recipe search for the online demo (issue "Online BCO", section Targets).

Built from the project's own pieces: the builtin SFT model and tokenizer, `generate` and `completion_logps`
(bco_ray/eval/generation.py), the verifier (bco_ray/eval/arithmetic.py `verify`, score >= 0.5 is desirable), and
the BCO loss with its running-mean δ (bco_ray/bco/loss.py, as bco_ray/train/forward.py uses them). Each round:
`--prompts` generated prompts of `--families` (bco_ray/assets/arithmetic/gen.py), `--k` samples each at
`--temperature` from the current policy, labels, reference log-probs (the frozen SFT model), `--epochs` passes
of AdamW in steps of `--batch-size` rows over the round's rows (plus `--replay` previous rounds'), and every
`--eval-every` rounds the held-out greedy verifier score of policy vs reference on `--eval-prompts` prompts of
those families: the bundled eval set's first ones (`--eval-source file`) or generated ones (`gen`). Training
prompts never share a (family, operands) pair with a held-out prompt or the bundled eval set, so a gain is not a
memorised answer. `--undesirable-weight` scales the undesirable rows' loss (the `weights` of `bco_losses`;
0 trains on the desirable rows only), `--balance` scales it by the round's #desirable/#undesirable.
One line per round, then a summary; `--json` writes the curve.

    python -m bench.online_recipe --families double --temperature 1 --lr 3e-4 --undesirable-weight 0 --rounds 30

Figures depend on the threads torch uses (`--threads`, default 1).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from dataclasses import dataclass, field

import torch

from bco_ray.assets.arithmetic import gen
from bco_ray.bco.logprobs import policy_completion_logps
from bco_ray.bco.loss import RunningMean, bco_losses
from bco_ray.builtin import BUILTIN_EVAL, SFT_DIR, resolve_data
from bco_ray.data.tokenize import with_bos
from bco_ray.eval.arithmetic import verify
from bco_ray.eval.generation import completion_logps, generate
from bco_ray.models import load_causal_lm, load_tokenizer


@dataclass
class Rows:
    """A round's labelled samples: prompt ids, completion ids (EOS included where the policy stopped), labels,
    and the frozen reference's summed completion log-probs."""

    prompts: list[list[int]] = field(default_factory=list)
    completions: list[list[int]] = field(default_factory=list)
    labels: list[bool] = field(default_factory=list)
    ref_logps: list[float] = field(default_factory=list)

    def extend(self, other: Rows) -> Rows:
        return Rows(*(a + b for a, b in zip(self.astuple(), other.astuple())))

    def astuple(self) -> tuple[list, list, list, list]:
        return self.prompts, self.completions, self.labels, self.ref_logps


class Task:
    """Tokenizer-side helpers: prompt ids as the eval pass builds them (BOS in front), completion text, score."""

    def __init__(self, tok, max_new_tokens: int):
        self.tok, self.max_new_tokens = tok, max_new_tokens
        self.eos, self.pad, self.bos = tok.eos_token_id, tok.pad_token_id, tok.bos_token_id

    def ids(self, prompt: str) -> list[int]:
        return with_bos(self.tok(prompt, add_special_tokens=False)["input_ids"], self.bos)

    def text(self, completion: list[int]) -> str:
        return self.tok.decode([t for t in completion if t != self.eos], skip_special_tokens=True)

    def score(self, prompt: str, completion: list[int]) -> float:
        return verify(prompt, self.text(completion))["score"]

    def generate(self, model, ids: list[list[int]], **kw) -> list[list[int]]:
        model.eval()
        kw = dict(max_new_tokens=self.max_new_tokens, eos_id=self.eos, pad_id=self.pad, batch_size=256) | kw
        return generate(model, ids, **kw)


def eval_prompts(families: list[str], n: int) -> list[str]:
    """The first `n` prompts of the bundled eval set whose family is one of `families` (all: every family)."""
    with open(resolve_data(BUILTIN_EVAL), encoding="utf-8") as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
    return [p for p in prompts if gen.solve(p)[0] in families][:n]


def operands(prompt: str) -> tuple:
    """(family, operands): prompts that differ only in phrasing share it; held-out ones are disjoint in it."""
    return gen.solve(prompt)[0], tuple(int(x) for x in re.findall(r"\d+", prompt))


def train_prompts(families: list[str], n: int, seed: int, r: int, exclude: set[tuple]) -> list[str]:
    """Round r's `n` generated prompts, families in turn, distinct in their operands and none of whose operands
    are in `exclude` (the held-out prompts')."""
    rng, seen = random.Random(f"{seed}-{r}"), set(exclude)
    out: list[str] = []
    for _ in range(200 * n):
        if len(out) == n:
            break
        prompt = gen.make_row(rng, families[len(out) % len(families)])["prompt"]
        if operands(prompt) not in seen:
            seen.add(operands(prompt))
            out.append(prompt)
    if len(out) < n:
        raise ValueError(f"{families} have fewer than {n} distinct operand sets left: ask for fewer prompts")
    return out


def greedy_score(task: Task, model, prompts: list[str]) -> float:
    outs = task.generate(model, [task.ids(p) for p in prompts])
    return 100.0 * sum(task.score(p, c) for p, c in zip(prompts, outs)) / len(prompts)


def sample_round(task: Task, policy, reference, prompts: list[str], a, r: int) -> Rows:
    """K samples per prompt from the current policy, labelled by the verifier, scored by the reference."""
    ids = [task.ids(p) for p in prompts for _ in range(a.k)]
    texts = [p for p in prompts for _ in range(a.k)]
    outs = task.generate(policy, ids, sample=True, temperature=a.temperature, top_p=a.top_p, seed=a.seed * 100003 + r)
    keep = [i for i, c in enumerate(outs) if c]
    rows = Rows([ids[i] for i in keep], [outs[i] for i in keep], [task.score(texts[i], outs[i]) >= 0.5 for i in keep])
    rows.ref_logps = completion_logps(reference, rows.prompts, rows.completions, task.pad)
    return rows


def _batch(rows: Rows, idx: list[int], pad: int):
    seqs = [rows.prompts[i] + rows.completions[i] for i in idx]
    n = max(len(s) for s in seqs)
    ids = torch.full((len(idx), n), pad, dtype=torch.long)
    mask = torch.zeros((len(idx), n), dtype=torch.long)
    for j, s in enumerate(seqs):
        ids[j, : len(s)], mask[j, : len(s)] = torch.as_tensor(s), 1
    plen = torch.as_tensor([len(rows.prompts[i]) for i in idx])
    labels = torch.as_tensor([rows.labels[i] for i in idx])
    ref = torch.as_tensor([rows.ref_logps[i] for i in idx], dtype=torch.float32)
    return ids, mask, plen, labels, ref


def update(policy, opt, delta: RunningMean, rows: Rows, a, r: int, pad: int) -> dict[str, float]:
    """`a.epochs` passes over `rows` in shuffled micro-batches of `a.batch_size`, one AdamW step each: δ absorbs
    the micro-batch's rewards first (as bco_ray/train/forward.py does), then the BCO loss is back-propagated."""
    policy.train()
    n_des = sum(rows.labels)
    w = a.undesirable_weight
    if a.balance:  # undesirable rows weigh as much in all as the desirable ones
        w *= min(1.0, n_des / max(len(rows.labels) - n_des, 1))
    rng = random.Random(f"{a.seed}-update-{r}")
    order, losses, rewards = list(range(len(rows.labels))), [], []
    for _ in range(a.epochs):
        rng.shuffle(order)
        for k in range(0, len(order), a.batch_size):
            ids, mask, plen, labels, ref = _batch(rows, order[k : k + a.batch_size], pad)
            logps = policy_completion_logps(policy, ids, mask, plen)
            shift = delta.update(a.beta * (logps.detach() - ref))
            weights = torch.full_like(ref, w)
            loss, reward = bco_losses(logps, ref, labels, weights, a.beta, shift)
            opt.zero_grad(set_to_none=True)
            loss.mean().backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), a.max_grad_norm)
            opt.step()
            losses.append(float(loss.detach().mean()))
            rewards.append(float(reward.detach().mean()))
    return {"loss": sum(losses) / max(len(losses), 1), "reward": sum(rewards) / max(len(rewards), 1)}


def run(a) -> dict:
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    tok = load_tokenizer(str(SFT_DIR))
    task = Task(tok, a.max_new_tokens)
    policy = load_causal_lm(str(SFT_DIR), dtype=torch.float32)
    reference = load_causal_lm(str(SFT_DIR), dtype=torch.float32).eval().requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    delta = RunningMean()
    bundled = {operands(p) for p in eval_prompts(list(gen.FAMILIES), 10**9)}
    if a.eval_source == "gen":  # generated held-out prompts (their own seed), none of them a bundled eval prompt
        held_out = train_prompts(a.families, a.eval_prompts, a.seed, -1, bundled)
    else:
        held_out = eval_prompts(a.families, a.eval_prompts)
    exclude = {operands(p) for p in held_out} | bundled
    ref_score = greedy_score(task, reference, held_out)
    print(f"eval: {len(held_out)} held-out prompts ({','.join(a.families)}); reference greedy {ref_score:.1f}%")
    curve, history, t0, best = [], [], time.perf_counter(), ref_score
    for r in range(a.rounds):
        t_round = time.perf_counter()
        rows = sample_round(task, policy, reference, train_prompts(a.families, a.prompts, a.seed, r, exclude), a, r)
        sample_s = time.perf_counter() - t_round
        history = (history + [rows])[-(a.replay + 1) :]
        batch = history[0]
        for extra in history[1:]:
            batch = batch.extend(extra)
        stats = update(policy, opt, delta, batch, a, r, task.pad)
        train_s = time.perf_counter() - t_round
        point = {
            "round": r + 1,
            "train_s": round(train_s, 2),
            "sample_s": round(sample_s, 2),
            "pass_rate": 100.0 * sum(rows.labels) / len(rows.labels),
        }
        point |= {"loss": round(stats["loss"], 4), "reward": round(stats["reward"], 4), "delta": float(delta.mean)}
        if a.eval_every and ((r + 1) % a.eval_every == 0 or r + 1 == a.rounds):
            point["score"] = greedy_score(task, policy, held_out)
            best = max(best, point["score"])
        point["elapsed_s"] = round(time.perf_counter() - t0, 1)
        curve.append(point)
        shown = f"policy {point['score']:5.1f}% vs ref {ref_score:5.1f}%" if "score" in point else ""
        print(
            f"round {r + 1:3d}  elapsed {point['elapsed_s']:6.1f}s  train {train_s:5.2f}s (sample {sample_s:4.2f}s)  "
            f"pass {point['pass_rate']:5.1f}%  loss {point['loss']:.3f}  δ {point['delta']:+.3f}  {shown}",
            flush=True,
        )
    final = curve[-1].get("score", float("nan"))
    summary = {
        "args": vars(a),
        "eval_prompts": len(held_out),
        "reference": ref_score,
        "final": final,
        "gain": final - ref_score,
        "best_gain": best - ref_score,
        "elapsed_s": curve[-1]["elapsed_s"],
        "train_s": round(sum(p["train_s"] for p in curve), 1),
        "curve": curve,
    }
    print(
        f"summary: reference {ref_score:.1f}% -> policy {final:.1f}% (gain {final - ref_score:+.1f} points, best "
        f"{best - ref_score:+.1f}) on {len(held_out)} held-out prompts; {a.rounds} rounds in {summary['elapsed_s']}s "
        f"({summary['train_s']}s generate+label+score+update, the rest eval) on {a.threads} thread(s)"
    )
    return summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--prompts", type=int, default=64, help="prompts per round")
    p.add_argument("--k", type=int, default=8, help="samples per prompt")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=64, help="rows per optimizer step")
    p.add_argument("--epochs", type=int, default=1, help="passes over the round's rows")
    p.add_argument("--replay", type=int, default=0, help="previous rounds' rows trained on again")
    p.add_argument("--undesirable-weight", type=float, default=1.0, help="weight of undesirable rows' loss")
    p.add_argument("--balance", action="store_true", help="scale undesirable weights by #desirable/#undesirable")
    p.add_argument("--families", default="double,sub", help="comma-separated gen.py families, or 'all'")
    p.add_argument("--eval-prompts", type=int, default=96)
    p.add_argument("--eval-source", choices=["file", "gen"], default="file", help="bundled eval set or generated")
    p.add_argument("--eval-every", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default="", help="write the summary and curve here")
    a = p.parse_args(argv)
    a.families = list(gen.FAMILIES) if a.families == "all" else a.families.split(",")
    unknown = [f for f in a.families if f not in gen.FAMILIES]
    if unknown:
        p.error(f"--families: unknown {unknown}; choose from {list(gen.FAMILIES)} or 'all'")
    return a


def main(argv=None) -> None:
    a = parse_args(argv)
    summary = run(a)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
