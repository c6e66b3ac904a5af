"""The pass's read: every split's rows through the one reader (bco_ray/data/reader.py), one Ray Data read task
per read unit (a file, a hub stream, an in-memory dataset). Each task checks its unit's rows exactly as the
driver's check does and yields them as unpaired rows of one schema, whatever the unit's format, so the train
and eval reads can be one stream: `prompt` and `completion` as JSON (a string or a list of messages), `label`,
and the split and source they come from. No torch here: read tasks import numpy and pyarrow only.

`count_rows` runs the read alone (no model loads) to check every row and count them, for data larger than the
driver checks whole before Ray (bco_ray/data/checks.py)."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator

import pyarrow as pa

from bco_ray.data.checks import SplitReport
from bco_ray.data.reader import ReadUnit, UnitCheck, iter_unit
from bco_ray.errors import BcoRayError

SPLIT, SOURCE = "__split", "__source"
BLOCK_ROWS = 4096


def _block(rows: list[dict], unit: ReadUnit) -> pa.Table:
    n = len(rows)
    return pa.table(
        {
            "prompt": pa.array([json.dumps(r["prompt"], ensure_ascii=False) for r in rows], pa.string()),
            "completion": pa.array([json.dumps(r["completion"], ensure_ascii=False) for r in rows], pa.string()),
            "label": pa.array([bool(r["label"]) for r in rows], pa.bool_()),
            SPLIT: pa.array([unit.split] * n, pa.string()),
            SOURCE: pa.array([unit.source] * n, pa.string()),
        }
    )


def read_unit(unit: ReadUnit, on_bad_rows: str, counters=None, block_rows: int = BLOCK_ROWS) -> Iterator[pa.Table]:
    """One read task: the unit's checked, unpaired rows in blocks; its counts to `counters` (if given) at the end."""
    check, rows = UnitCheck(unit, on_bad_rows), []
    for index, row in iter_unit(unit):
        rows.extend(check(index, row))
        if len(rows) >= block_rows:
            yield _block(rows, unit)
            rows = []
    rep = check.finish()
    if rows:
        yield _block(rows, unit)
    if counters is not None:
        counts = {k: v for k, v in rep.to_dict().items() if k not in ("bad_reasons", "complete")}
        counts.update({f"bad/{k}": v for k, v in rep.bad_reasons.items()})
        import ray

        # Waited for: the driver reads the counts once the read is done, and must not overtake this call.
        ray.get(counters.add.remote({f"{unit.split}/{k}": v for k, v in counts.items()}))


def rows_datasource(units: list[ReadUnit], on_bad_rows: str, counters=None):
    """A Ray Data datasource of one read task per unit, in the units' order."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class Rows(Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None):
            meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
            return [
                ReadTask(
                    functools.partial(read_unit, u, on_bad_rows, counters), meta, per_task_row_limit=per_task_row_limit
                )
                for u in units
            ]

        def get_name(self) -> str:
            return "ReadRows"

    return Rows()


def read_rows(units: list[ReadUnit], on_bad_rows: str, task_cpus: float, counters=None):
    """The units' rows as one Ray Dataset (checked, unpaired, one schema)."""
    import ray.data

    return ray.data.read_datasource(rows_datasource(units, on_bad_rows, counters), num_cpus=task_cpus)


def _n(table: pa.Table) -> pa.Table:
    return pa.table({"n": [table.num_rows]})


def count_rows(units: list[ReadUnit], on_bad_rows: str, task_cpus: float) -> dict[str, SplitReport]:
    """Check and count every row of the units in Ray (no model loads), per split. A bad row raises its
    file/row/field error here, as the driver's check would."""
    import ray

    from bco_ray.precompute.stages import Counters

    counters = Counters.remote()
    try:
        read_rows(units, on_bad_rows, task_cpus, counters).map_batches(
            _n, batch_format="pyarrow", num_cpus=task_cpus
        ).sum("n")
    except Exception as e:
        err = input_error_of(e)
        if err is None:
            raise
        raise err from None
    counts = ray.get(counters.get.remote())
    out = {}
    for split in sorted({u.split for u in units}):
        c = {k.split("/", 1)[1]: v for k, v in counts.items() if k.startswith(f"{split}/")}
        rep = SplitReport()
        rep.add(
            rows=c.get("rows", 0),
            bad_rows=c.get("bad_rows", 0),
            duplicates=c.get("duplicates", 0),
            desirable=c.get("desirable", 0),
            undesirable=c.get("undesirable", 0),
        )
        rep.bad_reasons = {k[4:]: v for k, v in c.items() if k.startswith("bad/")}
        out[split] = rep
    return out


def checked_table(units: list[ReadUnit], on_bad_rows: str) -> pa.Table:
    """The units' rows as one table, read here (not in Ray): what the pass's read yields for them."""
    blocks = [b for u in units for b in read_unit(u, on_bad_rows)]
    return pa.concat_tables(blocks) if blocks else _block([], units[0])


def input_error_of(e: BaseException) -> BcoRayError | None:
    """The bco-ray error (a bad row's file/row/field error, ...) a Ray task raised, found through Ray's wrappers
    (Ray Data's UserCodeException, RayTaskError, whose `cause` is the task's own exception), if any."""
    seen: set[int] = set()
    stack: list = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        cause = getattr(x, "cause", None)
        if isinstance(cause, BcoRayError):
            return cause
        if isinstance(x, BcoRayError) and not isinstance(x, _ray_task_error()):
            return x
        stack += [cause, x.__cause__, x.__context__]
    return None


def _ray_task_error() -> type:
    from ray.exceptions import RayTaskError

    return RayTaskError
