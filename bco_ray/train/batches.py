"""The typed micro-batches a policy update takes: right-padded (`PaddedBatch`) or packed (`PackedBatch`).

Each carries its tensors, how its loss is scaled into the step's gradient, whether it closes the optimizer
step (`closes_step`), the ids of its rows when the data has them, and its work (Σ L, Σ L², Σ C: the rows'
tokens, squared lengths and completion tokens) for throughput figures (bco_ray/train/throughput.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from bco_ray.data.packing import pad_right, to_device
from bco_ray.train.throughput import row_work


@dataclass
class PaddedBatch:
    """Right-padded rows. Its loss is the micro-batch's mean, which the engine divides by the accumulation
    steps (`divide_by_gas`)."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    prompt_len: torch.Tensor  # [B]
    label: torch.Tensor  # [B] bool
    ref_logps: torch.Tensor  # [B] float32
    udm_weight: torch.Tensor  # [B] float32
    closes_step: bool = True
    row_ids: np.ndarray | None = None
    work: tuple[int, int, int] = (0, 0, 0)
    divide_by_gas = True

    def to(self, device) -> PaddedBatch:
        tensors = {k: getattr(self, k).to(device) for k in _PADDED_TENSORS}
        return PaddedBatch(**tensors, closes_step=self.closes_step, row_ids=self.row_ids, work=self.work)

    def loss(self, losses: torch.Tensor, aux) -> torch.Tensor:
        """The micro-batch's mean loss plus the MoE term."""
        return losses.mean() + aux

    @property
    def computed_tokens(self) -> int:
        return self.attention_mask.numel()

    @property
    def valid(self) -> None:  # every row counts
        return None


_PADDED_TENSORS = ("input_ids", "attention_mask", "prompt_len", "label", "ref_logps", "udm_weight")


@dataclass
class PackedBatch:
    """Rows packed back to back (bco_ray/data/packing.py's `collate_packed`: `tensors` holds its output). Each
    row's loss is weighted by 1 / (this rank's rows in the step), so the step's gradient is the mean over its
    rows however they were packed: the engine must not divide it again (`divide_by_gas`).

    A pack holds whole micro-batches (`mb`: each row's index among the pack's `n_mb`); each row's loss uses δ
    after its own micro-batch. A micro-batch split across packs has δ absorbed first: its first pack lists
    them all (`absorb_first`), and every one of them has `delta_done`."""

    tensors: dict
    mb: torch.Tensor
    n_mb: int = 1
    closes_step: bool = True
    row_ids: np.ndarray | None = None
    delta_done: bool = False
    absorb_first: list[PackedBatch] = field(default_factory=list)
    divide_by_gas = False

    @property
    def work(self) -> tuple[int, int, int]:
        t = self.tensors
        return t["tokens"], t["sum_len_sq"], t["completion_tokens"]

    @property
    def label(self) -> torch.Tensor:
        return self.tensors["label"]

    @property
    def ref_logps(self) -> torch.Tensor:
        return self.tensors["ref_logps"]

    @ref_logps.setter
    def ref_logps(self, value: torch.Tensor) -> None:
        self.tensors["ref_logps"] = value

    @property
    def udm_weight(self) -> torch.Tensor:
        return self.tensors["udm_weight"]

    @property
    def valid(self) -> torch.Tensor:  # 0 for an empty pack's dummy row
        return self.tensors["valid"]

    @property
    def computed_tokens(self) -> int:
        return self.tensors["input_ids"].shape[1]

    def loss(self, losses: torch.Tensor, aux) -> torch.Tensor:
        """Σ row_weight · loss, plus the MoE term weighted by the pack's share of the step's rows."""
        return (losses * self.tensors["row_weight"]).sum() + aux * self.tensors["aux_weight"]


Batch = PaddedBatch | PackedBatch


def collate(rows: dict, pad_id: int, closes_step: bool = True) -> PaddedBatch:
    """A right-padded micro-batch of rows (numpy or list columns of the precomputed Parquet), on the CPU."""
    seqs = [np.asarray(s, dtype=np.int64) for s in rows["input_ids"]]
    ids, mask = pad_right(seqs, pad_id)
    return PaddedBatch(
        input_ids=ids,
        attention_mask=mask,
        prompt_len=torch.as_tensor(np.asarray(rows["prompt_len"], dtype=np.int64)),
        label=torch.as_tensor(np.asarray(rows["label"], dtype=bool)),
        ref_logps=torch.as_tensor(np.asarray(rows["ref_logps"], dtype=np.float32)),
        udm_weight=torch.as_tensor(np.asarray(rows["udm_weight"], dtype=np.float32)),
        closes_step=closes_step,
        row_ids=np.asarray(rows["row_id"]) if "row_id" in rows else None,
        work=row_work([len(s) for s in seqs], rows["prompt_len"]),
    )


def packed(tensors: dict, device, mb: np.ndarray, n_mb: int, closes_step: bool, row_ids=None) -> PackedBatch:
    """A `collate_packed` output on `device` as a PackedBatch (`mb`: each row's micro-batch within the pack)."""
    mb_t = torch.from_numpy(np.asarray(mb, dtype=np.int64)).to(device)
    return PackedBatch(to_device(tensors, device), mb_t, n_mb, closes_step, row_ids)
