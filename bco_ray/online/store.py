"""Where an online run keeps its rounds, on a local path or any fsspec URI (s3://...):

    <root>/round=<r>/rows.parquet   the round's labelled samples: prompt, completion, label, round, policy_step
                                    (unpaired rows: `bco-ray train --data.train=<root>` trains on them offline);
                                    written once, atomically (a temporary file renamed into place), before the
                                    round's update starts; the count of samples whose labelling failed rides in
                                    the file's metadata
    <root>/round=<r>/updated        written after the round's update (and, in a job, its round-boundary
                                    checkpoint) is committed: JSON with the round's metrics and the update's
    <root>/round=<r>/logged         written after the round's metrics (and its eval) are in the tracker's run
    <root>/evaluated_step=<s>       written after the held-out eval of the policy after s rounds is logged

So a round is labelled at most once (its rows exist: they are read back, never regenerated) and trained at most
once (its marker exists: it is done); `next_round` finds where a stopped run resumes. The rows are read back
through the one reader (bco_ray/data/reader.py), as offline training would read them."""

from __future__ import annotations

import json
import re
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from bco_ray import storage
from bco_ray.data.reader import UnitCheck, iter_unit, plan_units
from bco_ray.errors import StorageError

ROWS, MARKER, LOGGED = "rows.parquet", "updated", "logged"
_ROUND_DIR = re.compile(r"round=(\d+)$")


def _atomic_write(uri: str, data: bytes) -> None:
    """`data` into `uri` as one whole file: written beside it under a hidden temporary name, then renamed."""
    fs, path = fsspec.core.url_to_fs(uri)
    parent, _, name = path.rpartition("/")
    fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.{name}.tmp-{uuid.uuid4().hex}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


class RoundStore:
    """The rounds of one online run under `root` (see the module doc)."""

    def __init__(self, root: str):
        self.root = root
        self.fs, self._path = fsspec.core.url_to_fs(root)

    def uri(self, r: int, name: str = ROWS) -> str:
        return storage.join(self.root, f"round={r}", name)

    def _exists(self, r: int, name: str) -> bool:
        return self.fs.exists(fsspec.core.url_to_fs(self.uri(r, name))[1])

    def has_rows(self, r: int) -> bool:
        return self._exists(r, ROWS)

    def is_updated(self, r: int) -> bool:
        return self._exists(r, MARKER)

    def write_rows(self, r: int, rows: list[dict], label_errors: int = 0) -> str:
        """Commit round r's rows (prompt, completion, label, round, policy_step); refuses to replace them."""
        if self.has_rows(r):
            raise StorageError(f"round {r}'s rows are already committed at {self.uri(r)}: a round is labelled once")
        table = pa.Table.from_pylist(rows).replace_schema_metadata({"label_errors": str(label_errors)})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        _atomic_write(self.uri(r), sink.getvalue().to_pybytes())
        return self.uri(r)

    def read_rows(self, r: int) -> list[dict]:
        """Round r's rows as the one reader gives them: {prompt, completion, label}."""
        out: list[dict] = []
        for unit in plan_units(self.uri(r), "train"):
            check = UnitCheck(unit, "error")
            for index, row in iter_unit(unit):
                out.extend(check(index, row))
            check.finish()
        return out

    def label_errors(self, r: int) -> int:
        with fsspec.open(self.uri(r), "rb") as f:
            meta = pq.read_schema(f).metadata or {}
        return int(meta.get(b"label_errors", b"0"))

    def mark_updated(self, r: int, info: dict) -> None:
        if not self.has_rows(r):
            raise StorageError(f"round {r} has no committed rows at {self.uri(r)}: commit them before its update")
        _atomic_write(self.uri(r, MARKER), json.dumps(info, sort_keys=True).encode())

    def updated_info(self, r: int) -> dict:
        with fsspec.open(self.uri(r, MARKER), "r") as f:
            return json.load(f)

    def mark_logged(self, r: int) -> None:
        _atomic_write(self.uri(r, LOGGED), b"")

    def is_logged(self, r: int) -> bool:
        return self._exists(r, LOGGED)

    def _eval_uri(self, step: int) -> str:
        return storage.join(self.root, f"evaluated_step={step}")

    def mark_evaluated(self, step: int) -> None:
        _atomic_write(self._eval_uri(step), b"")

    def is_evaluated(self, step: int) -> bool:
        return self.fs.exists(fsspec.core.url_to_fs(self._eval_uri(step))[1])

    def unlogged(self) -> list[int]:
        """The rounds trained (marked) whose metrics are not in the tracker's run yet: the job stopped between a
        round's marker and the end of its logging. A resumed job logs them before it runs a round."""
        return [r for r, (_, marked) in sorted(self.rounds().items()) if marked and not self.is_logged(r)]

    def rounds(self) -> dict[int, tuple[bool, bool]]:
        """{round: (rows committed, update marked)} of every round directory under the root."""
        if not self.fs.exists(self._path):
            return {}
        out = {}
        for entry in self.fs.ls(self._path, detail=False):
            m = _ROUND_DIR.search(entry.rstrip("/"))
            if m:
                r = int(m[1])
                out[r] = (self.has_rows(r), self.is_updated(r))
        return out

    def next_round(self) -> tuple[int, bool]:
        """(the first round not trained, whether its rows are already committed). Rounds are trained in order,
        so every earlier round is marked and no later one holds anything; a store that says otherwise was
        written by something else and is refused."""
        state = self.rounds()
        r = 0
        while state.get(r, (False, False))[1]:
            r += 1
        has_rows = state.get(r, (False, False))[0]
        stray = sorted(q for q, (rows, marked) in state.items() if q > r and (rows or marked))
        broken = sorted(q for q, (rows, marked) in state.items() if marked and not rows)
        if stray or broken:
            raise StorageError(
                f"online rounds at {self.root}: round {r} is the first not trained, yet rounds {stray or broken} "
                f"{'hold rows or markers' if stray else 'are marked trained without rows'}; this directory was "
                "not written by one online run: use a new mlflow.run_name or output_dir"
            )
        return r, has_rows

    def reconcile(self, checkpointed: int) -> int:
        """Agree with the trainer's checkpoint, which holds `checkpointed` rounds: a round it holds but the store
        has not marked (the job stopped between the round's checkpoint and its marker) is marked now, so it is not
        trained twice. Returns the round to run next. A checkpoint behind the markers is refused."""
        start, _ = self.next_round()
        if checkpointed < start:
            raise StorageError(
                f"online rounds at {self.root}: {start} rounds are marked trained but the latest checkpoint holds "
                f"{checkpointed}; the checkpoints under train.storage_path were removed: use a new mlflow.run_name"
            )
        for r in range(start, checkpointed):
            self.mark_updated(r, {"round": r, "from_checkpoint": True})
        return checkpointed
