"""The data check at scale: every row of a generated split, checked by the driver alone (one process, serially,
as the driver checked whole splits before) and by the pass's read tasks (bco_ray/precompute/read.py: one task
per file, on a local Ray with this machine's CPUs), in the same process on the same files. Prints rows/s of
each, their ratio, and a last `RESULT {json}` line.

    python bench/check_rows.py --rows 1000000 --files 8
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def generate(d: Path, rows: int, files: int, seed: int = 0) -> None:
    """`rows` unpaired rows (arithmetic prompts, right and wrong answers) over `files` JSON Lines files."""
    rng = random.Random(seed)
    per = -(-rows // files)
    for f in range(files):
        with open(d / f"part-{f:03d}.jsonl", "w") as out:
            for _ in range(min(per, rows - f * per)):
                a, b = rng.randrange(1000), rng.randrange(1000)
                ok = rng.random() < 0.5
                c = a + b if ok else a + b + rng.randrange(1, 9)
                out.write(json.dumps({"prompt": f"What is {a} + {b}?\nAnswer:", "completion": f" {c}", "label": ok}))
                out.write("\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--files", type=int, default=8)
    args = ap.parse_args()

    import ray

    from bco_ray.data.checks import check_source
    from bco_ray.job.resources import usable_cpus
    from bco_ray.precompute.read import count_rows

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        t0 = time.perf_counter()
        generate(d, args.rows, args.files)
        print(f"generated {args.rows} rows in {args.files} files in {time.perf_counter() - t0:.1f} s")

        t0 = time.perf_counter()
        driver = check_source(str(d), "error")
        t_driver = time.perf_counter() - t0
        print(f"driver (serial):   {driver.rows} rows in {t_driver:.1f} s = {driver.rows / t_driver:,.0f} rows/s")

        cpus = usable_cpus()
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray.init(address="local", num_cpus=cpus, log_to_driver=False)
        ray.data.DataContext.get_current().use_datasource_v2 = False
        t0 = time.perf_counter()
        counted = count_rows(driver.units, "error", task_cpus=1)["train"]
        t_pass = time.perf_counter() - t0
        ray.shutdown()
        assert (counted.rows, counted.labels) == (driver.rows, driver.labels), "the two checks disagree"
        print(f"pass ({cpus} CPUs): {counted.rows} rows in {t_pass:.1f} s = {counted.rows / t_pass:,.0f} rows/s")
        print(f"RATIO pass/driver rows/s: {t_driver / t_pass:.2f}x")
        result = {
            "rows": driver.rows,
            "files": args.files,
            "cpus": cpus,
            "driver_rows_per_s": round(driver.rows / t_driver),
            "pass_rows_per_s": round(counted.rows / t_pass),
            "ratio": round(t_driver / t_pass, 2),
        }
        print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
