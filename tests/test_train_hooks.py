"""The hook seam of the training workers (bco_ray/train/hooks.py): `$BCO_RAY_TRAIN_HOOKS` installs hooks from a
module or a file, the driver forwards only the hook variables, and a step's row ids come from its batches."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bco_ray.train import hooks


@pytest.fixture(autouse=True)
def _clean():
    hooks.clear()
    yield
    hooks.clear()


def test_hooks_from_a_file_run_in_order_and_see_the_step(tmp_path, monkeypatch):
    (tmp_path / "my_hooks.py").write_text(
        "import json, os\n"
        "from bco_ray.train import hooks\n"
        "def note(*x):\n"
        "    with open(os.environ['SEEN'], 'a') as f:\n"
        "        f.write(json.dumps(x) + '\\n')\n"
        "def install():\n"
        "    hooks.before_micro_batch(lambda step, batch: note('before', step))\n"
        "    hooks.at_step_end(lambda end: note('end', end.step, end.row_ids))\n"
    )
    monkeypatch.setenv("SEEN", str(tmp_path / "seen.jsonl"))
    monkeypatch.setenv(hooks.ENV, f"{tmp_path / 'my_hooks.py'}:install")
    hooks.install_from_env()
    hooks.install_from_env()  # installing again replaces, never doubles

    class B:
        def __init__(self, ids):
            self.row_ids = ids

    batches = [B(np.array([3, 1])), B(None), B(np.array([7]))]
    hooks.run_before(4, batches[0])
    hooks.run_step_end(hooks.StepEnd(step=4, rank=0, world=1, storage_dir=str(tmp_path), micro_batches=batches))
    seen = [json.loads(x) for x in (tmp_path / "seen.jsonl").read_text().splitlines()]
    assert seen == [["before", 4], ["end", 4, [3, 1, 7]]]


def test_only_hook_variables_travel_to_the_workers():
    env = {
        "BCO_RAY_TRAIN_HOOKS": "m:f",
        "BCO_RAY_TRAIN_HOOK_FAIL_AT_STEP": "3",
        "HOME": "/x",
        "BCO_RAY_PEAK_TFLOPS": "1",
    }
    assert hooks.env_for_workers(env) == {"BCO_RAY_TRAIN_HOOKS": "m:f", "BCO_RAY_TRAIN_HOOK_FAIL_AT_STEP": "3"}


def test_a_malformed_entry_names_the_variable(monkeypatch):
    monkeypatch.setenv(hooks.ENV, "no_function_here")
    with pytest.raises(ValueError, match="BCO_RAY_TRAIN_HOOKS"):
        hooks.install_from_env()
