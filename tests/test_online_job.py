"""Online BCO end to end (marked e2e): one job for the module, `python jobs/online.py` on the session's Ray head
(2 CPUs: one training worker beside the rollout actor), 2 rounds of 8 prompts × 2 samples from the tiny builtin
policy, UDM off, the held-out generation eval on 8 prompts → Ray Train + DeepSpeed (the worker group kept alive across the rounds) → MLflow. The round logic
itself is unit-tested without Ray in tests/test_online_rounds.py and tests/test_online_parts.py."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from bco_ray.eval.arithmetic import verify
from bco_ray.online.labeler import verdict
from bco_ray.online.store import RoundStore

from harness import run_job

ROUNDS, PROMPTS, K = 2, 8, 2
ROWS = PROMPTS * K  # one optimizer step of train.micro_batch_size=16 rows a round


@pytest.fixture(scope="module")
def online_job(ray_head, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("online-job")
    proc = run_job(
        tmp,
        f"--online.rounds={ROUNDS}",
        f"--online.prompts_per_round={PROMPTS}",
        f"--online.samples_per_prompt={K}",
        "--online.max_new_tokens=8",
        "--eval.num_prompts=8",
        "--eval.max_new_tokens=8",
        "--mlflow.run_name=online",
        head=ray_head,
        script="online.py",
    )
    assert proc.returncode == 0, (tmp / "job.log").read_text()[-6000:]
    result = json.loads((tmp / "outputs" / "runs" / "online" / "result.json").read_text())
    return tmp, result


@pytest.mark.e2e
def test_stored_labels_are_the_labelers(online_job):
    tmp, _ = online_job
    store = RoundStore(str(tmp / "outputs" / "ray" / "online" / "online" / "rounds"))
    assert store.next_round() == (ROUNDS, False)
    for r in range(ROUNDS):
        rows = store.read_rows(r)
        assert len(rows) == ROWS
        assert all(row["label"] == verdict(verify(row["prompt"], row["completion"]), 0.5) for row in rows)


@pytest.mark.e2e
def test_worker_group_started_once_and_delta_carries_over(online_job):
    _, result = online_job
    assert len(result["starts"]) == 1 and result["starts"][0]["rounds_done"] == 0
    final = result["final"]
    assert final["step"] == ROUNDS and final["rounds"] == ROUNDS
    assert final["delta_count"] == pytest.approx(ROUNDS * ROWS)  # δ absorbed every round's rewards: never reset
    assert [r["online/policy_step"] for r in result["rounds"]] == [1.0, 2.0]


@pytest.mark.e2e
def test_mlflow_has_rounds_and_steps(online_job):
    tmp, result = online_job
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")

    def steps(key):
        return sorted(m.step for m in client.get_metric_history(result["run_id"], key))

    assert steps("online/pass_rate") == [0, 1]
    for key in ("time/round/generate", "time/round/sync", "time/round/update", "time/round/overhead"):
        assert steps(key) == [0, 1], key
    assert steps("loss") == [1, 2] and steps("delta") == [1, 2]
    # the held-out eval: the initial policy (step 0), then after each round (online.eval_every=1)
    assert steps("eval/gen/score") == [0, 1, 2] and steps("eval/gen/score_ref") == [0, 1, 2]
    delta = {m.step: m.value for m in client.get_metric_history(result["run_id"], "delta")}
    assert delta[2] == pytest.approx(result["final"]["delta"])
    assert client.get_run(result["run_id"]).info.status == "FINISHED"
    tables = [f.path for f in client.list_artifacts(result["run_id"], "online")]
    assert tables == [f"online/samples_round_{r:04d}.json" for r in range(ROUNDS)]
