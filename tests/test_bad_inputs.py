"""Bad input gets one clear error naming the field (and file/row for data) before any cluster work:
no Ray started, no MLflow run opened, nothing trained."""

from __future__ import annotations

import importlib.util
import json

import pytest

from harness import ROOT, run_job

spec = importlib.util.spec_from_file_location("bco_job", ROOT / "jobs" / "bco.py")
bco_job = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bco_job)


def _jsonl(path, rows, raw: bytes = b""):
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows) + raw)
    return path


GOOD = [{"prompt": f"What is {i} + 1?", "completion": f" {i + 1}", "label": i % 2 == 0} for i in range(40)]


@pytest.fixture(autouse=True)
def _no_ray_work(monkeypatch, request):
    """Fails the test if the job reaches the point where it joins or starts Ray. (This pytest process may
    already be a Ray driver, for the session's in-process tests, so `ray.is_initialized()` cannot tell.)"""
    import bco_ray.job.run

    if request.node.get_closest_marker("e2e"):
        return

    def init_ray(cfg):
        raise AssertionError("the job reached Ray: the bad input was not caught before cluster work")

    monkeypatch.setattr(bco_ray.job.run, "init_ray", init_ray)


def _run(tmp_path, capsys, *args):
    rc = bco_job.main(
        [
            f"--output_dir={tmp_path / 'out'}",
            f"--mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
            "--data.eval=none",
            *args,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2, err
    assert not (tmp_path / "m.db").exists()  # no MLflow run opened
    assert not (tmp_path / "out" / "ray").exists()  # nothing trained
    return err


CONFIG_CASES = [
    (["--train.lrr=1e-6"], "unknown config field 'train.lrr'. Did you mean 'train.lr'?"),
    (["--udm.enabeld=false"], "Did you mean 'udm.enabled'?"),
    (["--train.num_workers=two"], "config field 'train.num_workers': expected an integer, got 'two'"),
    (["--train.beta=0"], "train.beta must be > 0"),
    (["--train.beta=-0.5"], "train.beta must be > 0"),
    (["--train.zero_stage=4"], "train.zero_stage must be 0, 1, 2 or 3 (got 4)"),
    (
        ["--udm.min_density_ratio=5", "--udm.max_density_ratio=2"],
        "udm.min_density_ratio (5.0) must be <= udm.max_density_ratio (2.0)",
    ),
    (["--data.max_prompt_length=64"], "data.max_prompt_length (64) must be > 0 and < data.max_length (64)"),
    (["--train.num_workers=0"], "train.num_workers must be >= 1 (got 0)"),
    (["--train.offload_params=true"], "train.offload_params needs train.zero_stage=3"),
    (["--data.on_bad_rows=ignore"], "data.on_bad_rows must be error or skip"),
    (["--mlflow.run_name=../escape"], "mlflow.run_name '../escape' becomes a directory name"),
    (["--mlflow.run_name=a/b"], "no '..' and no path separators"),
    (["--train.keep_checkpoints=0"], "train.keep_checkpoints must be >= 1 (got 0)"),
    (["--train.lr=inf"], "train.lr must be a finite number >= 0 (got inf)"),
]


@pytest.mark.parametrize("args,message", CONFIG_CASES, ids=[c[0][0] for c in CONFIG_CASES])
def test_bad_config(tmp_path, capsys, args, message):
    assert message in _run(tmp_path, capsys, *args)


def _bad_data_cases(tmp_path):
    rows = [dict(r) for r in GOOD]
    cases = []
    r = [dict(x) for x in rows]
    del r[7]["label"]
    cases.append((r, b"", "row 7, field 'label'", "missing"))
    r = [dict(x) for x in rows]
    r[3]["label"] = "yes"
    cases.append((r, b"", "row 3, field 'label': expected a boolean", "yes"))
    r = [dict(x) for x in rows]
    r[5]["prompt"] = 17
    cases.append((r, b"", "row 5, field 'prompt'", "wrong type"))
    r = [dict(x) for x in rows]
    r[9]["prompt"] = "   "
    cases.append((r, b"", "row 9, field 'prompt'", "empty prompt"))
    r = [dict(x) for x in rows]
    r[11]["completion"] = ""
    cases.append((r, b"", "row 11, field 'completion'", "empty completion"))
    r = [dict(x) for x in rows]
    r[12] = {"prompt": "p", "chosen": " a", "rejected": " b"}
    cases.append((r, b"", "row 12", "mixed formats"))
    cases.append((rows, b"{not json\n", "row 40", "invalid JSON"))
    cases.append((rows, b'{"prompt": "\xff\xfe", "completion": " 1", "label": true}\n', "row 40", "non-UTF-8"))
    return cases


@pytest.mark.parametrize("i", range(8))
def test_bad_data_rows_name_file_row_and_field(tmp_path, capsys, i):
    rows, raw, where, _ = _bad_data_cases(tmp_path)[i]
    path = _jsonl(tmp_path / "train.jsonl", rows, raw)
    err = _run(tmp_path, capsys, f"--data.train={path}")
    assert "train.jsonl" in err and where in err, err


def test_bad_rows_can_be_skipped_instead(tmp_path):
    from bco_ray.config.schema import load_config
    from bco_ray.data.checks import check_data

    rows = [dict(r) for r in GOOD]
    rows[3]["label"] = "yes"
    path = _jsonl(tmp_path / "train.jsonl", rows, b"{not json\n")
    rep = check_data(load_config(overrides=[f"--data.train={path}", "--data.eval=none", "--data.on_bad_rows=skip"]))
    assert rep.train.bad_rows == 2 and rep.train.rows == 39


def test_single_class_with_udm(tmp_path, capsys):
    path = _jsonl(tmp_path / "train.jsonl", [dict(r, label=True) for r in GOOD])
    err = _run(tmp_path, capsys, f"--data.train={path}")
    assert "only desirable rows" in err and "--udm.enabled=false" in err


def test_fewer_rows_than_one_global_batch(tmp_path, capsys):
    path = _jsonl(tmp_path / "train.jsonl", GOOD[:10])
    err = _run(tmp_path, capsys, f"--data.train={path}", "--train.micro_batch_size=8")
    assert "fewer than one global batch" in err and "train.micro_batch_size 8" in err


def test_output_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "taken").write_text("not a directory")
    err = _run(tmp_path, capsys, f"--output_dir={tmp_path / 'taken'}")
    assert f"config error: output_dir={tmp_path / 'taken'}: {tmp_path / 'taken'} exists and is not a directory" in err


def test_missing_data_file(tmp_path, capsys):
    assert "does not exist" in _run(tmp_path, capsys, f"--data.train={tmp_path / 'nope.jsonl'}")


def test_policy_path_that_does_not_exist(tmp_path, capsys):
    err = _run(tmp_path, capsys, f"--model.policy={tmp_path / 'no-model'}")
    assert "model.policy" in err and "does not exist" in err


def test_policy_and_reference_with_different_vocabularies(tmp_path, capsys):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from bco_ray.builtin import materialize_tiny_model

    policy = materialize_tiny_model(tmp_path / "policy")
    cfg = Qwen2Config.from_pretrained(policy)
    cfg.vocab_size = 600
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "ref")
    err = _run(tmp_path, capsys, f"--model.policy={policy}", f"--model.reference={tmp_path / 'ref'}")
    assert "model.reference has 600" in err and "same tokenizer" in err


def test_duplicates_warn_but_run_checks(tmp_path, caplog):
    from bco_ray.config.schema import load_config
    from bco_ray.data.checks import check_data

    path = _jsonl(tmp_path / "train.jsonl", GOOD + GOOD[:5])
    rep = check_data(load_config(overrides=[f"--data.train={path}", "--data.eval=none"]))
    assert rep.train.duplicates == 5 and "5 duplicate rows" in caplog.text


def test_tokenizer_without_pad_token_gets_one(tmp_path, caplog):
    from transformers import AutoTokenizer

    from bco_ray.builtin import tokenizer_path
    from bco_ray.models import load_tokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path())
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(str(tmp_path / "tok"))
    assert loaded.pad_token == loaded.eos_token and "has no pad token" in caplog.text


@pytest.mark.e2e
def test_gpus_requested_where_there_are_none(tmp_path):
    """A local Ray (started by the job, in its own process, as `make demo` does) has no GPU: one clear error."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = run_job(tmp_path, "--data.eval=none", "--train.use_gpu=true")
    assert proc.returncode == 2 and "ask for GPUs but this Ray has none" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "outputs" / "ray").exists() and not (tmp_path / "outputs" / "cache").exists()
