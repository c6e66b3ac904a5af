"""Summed completion log-probs without a float32 [batch, seq, vocab] tensor.

Only the positions that predict completion tokens go through the LM head, in chunks of
`chunk_size` tokens; each chunk is recomputed in backward (activation checkpointing), so the
peak extra memory is one chunk's logits, whatever the batch and sequence length.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _chunk_logps(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def completion_positions(input_ids: torch.Tensor, prompt_len: torch.Tensor, seq_len: torch.Tensor):
    """(row, pos) of every hidden state that predicts a completion token.

    The token at position t (prompt_len <= t < seq_len) is predicted by the hidden state at t-1.
    """
    t = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
    mask = (t >= prompt_len.unsqueeze(1)) & (t < seq_len.unsqueeze(1)) & (t > 0)
    rows, pos = mask.nonzero(as_tuple=True)
    return rows, pos


def completion_logps(
    hidden: torch.Tensor,
    lm_head: nn.Module,
    input_ids: torch.Tensor,
    prompt_len: torch.Tensor,
    seq_len: torch.Tensor,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """sum_{t in [prompt_len, seq_len)} log p(input_ids[t] | input_ids[:t]) per row, float32.

    hidden: [B, T, H] final hidden states (after the final norm), lm_head: the output layer.
    Padding (positions >= seq_len) never contributes.
    """
    rows, pos = completion_positions(input_ids, prompt_len, seq_len)
    h = hidden[rows, pos - 1]
    targets = input_ids[rows, pos]
    out = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=hidden.device)
    needs_grad = torch.is_grad_enabled() and h.requires_grad
    for start in range(0, h.shape[0], chunk_size):
        hs, ts = h[start:start + chunk_size], targets[start:start + chunk_size]
        lp = checkpoint(_chunk_logps, lm_head, hs, ts, use_reentrant=False) if needs_grad \
            else _chunk_logps(lm_head, hs, ts)
        out = out.index_add(0, rows[start:start + chunk_size], lp)
    return out


def policy_completion_logps(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            prompt_len: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Run a Hugging Face causal LM's backbone and sum completion log-probs (right-padded batch)."""
    backbone = model.get_decoder()
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    seq_len = attention_mask.sum(dim=1)
    return completion_logps(hidden, model.get_output_embeddings(), input_ids, prompt_len, seq_len, chunk_size)
