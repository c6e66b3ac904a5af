"""Hugging Face outputs and what may be loaded from disk: the model card of a saved model, the optional push
to the Hub (against a fake hub endpoint on loopback: there is no hub access here), and the checks that keep
anything executable from being loaded from shared storage (`udm.embedding_func`, names that become paths)."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from huggingface_hub import ModelCard

from bco_ray.config.schema import ConfigError, load_config
from bco_ray.data.checks import DataReport, LabelCounts, SplitReport
from bco_ray.precompute.embedding_func import EmbeddingFuncError, check_embedding_func, load_embedding_func
from bco_ray.tracking import hub, model_card

FINAL = {"step": 30, "delta": 0.0123, "loss": 0.61, "eval/loss": 0.65, "eval/auc": 0.71, "eval/accuracy": 0.66}
REPORT = DataReport(
    train=SplitReport(rows=3000, labels=LabelCounts(desirable=1500, undesirable=1500)),
    eval=SplitReport(rows=400, labels=LabelCounts(desirable=200, undesirable=200)),
)


# ------------------------------------------------------------------------------------------- model card
def test_model_card_names_base_model_data_settings_metrics_and_loading(tmp_path):
    cfg = load_config(
        overrides=[
            "--model.policy=Qwen/Qwen2.5-0.5B-Instruct",
            "--train.beta=0.25",
            "--data.train=hf:org/feedback@v1/en:train",
            "--hub.repo_id=me/bco-qwen",
        ]
    )
    (tmp_path / "model").mkdir()
    path = model_card.write_model_card(
        tmp_path / "model", cfg, FINAL, run_id="abc123", run_name="bco-qwen", data_report=REPORT
    )
    assert path == tmp_path / "model" / "README.md"
    card = ModelCard.load(path)  # what the Hub reads
    meta = card.data.to_dict()
    assert meta["base_model"] == "Qwen/Qwen2.5-0.5B-Instruct" and meta["library_name"] == "transformers"
    assert meta["datasets"] == ["org/feedback"] and "bco" in meta["tags"]
    text = card.text
    for needle in (
        "# bco-qwen",
        "`Qwen/Qwen2.5-0.5B-Instruct`",
        "`hf:org/feedback@v1/en:train`",
        "| 3000 |",
        "| beta (train.beta) | 0.25 |",
        "| eval/auc | 0.71 |",
        "| eval/loss | 0.65 |",
        "| loss | 0.61 |",
        "After 30 optimizer steps",
        'AutoModelForCausalLM.from_pretrained("me/bco-qwen")',
        'mlflow.transformers.load_model("runs:/abc123/model")',
        "UDM (underlying-distribution matching) | on",
    ):
        assert needle in text, needle


def test_model_card_of_a_lora_adapter_loads_with_peft(tmp_path):
    cfg = load_config(overrides=["--train.lora.enabled=true", "--udm.enabled=false"])
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "merged").mkdir()
    model_card.write_model_card(tmp_path, cfg, FINAL)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "peft" and "AutoPeftModelForCausalLM" in card.text
    assert "base_model" not in card.data.to_dict()  # builtin:tiny-qwen2 is not a hub id
    assert "| UDM (underlying-distribution matching) | off" in card.text and "| LoRA | r 16" in card.text
    assert "AutoModelForCausalLM" in (tmp_path / "merged" / "README.md").read_text()


# ------------------------------------------------------------------------------------------------ hub
class _FakeHub(BaseHTTPRequestHandler):
    """The part of the Hub's HTTP API that `create_repo` + `upload_folder` use; records what it is sent."""

    commits: list = []
    auth: list = []
    validated: list = []

    def log_message(self, *a):
        pass

    def _reply(self, obj, code=200):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.auth.append(self.headers.get("Authorization"))
        if self.path == "/api/repos/create":
            req = json.loads(data)
            host, port = self.server.server_address
            return self._reply({"url": f"http://{host}:{port}/{req.get('organization')}/{req['name']}"})
        if self.path == "/api/validate-yaml":  # the hub checks a README's metadata before a commit
            self.validated.append(json.loads(data)["content"])
            return self._reply({"errors": [], "warnings": []})
        if "/preupload/" in self.path:
            files = json.loads(data)["files"]
            return self._reply(
                {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        if "/commit/" in self.path:
            lines = [json.loads(x) for x in data.decode().splitlines() if x.strip()]
            files = {x["value"]["path"]: base64.b64decode(x["value"]["content"]) for x in lines if x["key"] == "file"}
            self.commits.append({"path": self.path, "files": files})
            return self._reply(
                {
                    "commitUrl": "http://{}:{}/me/bco/commit/{}".format(*self.server.server_address, "c" * 40),
                    "commitOid": "c" * 40,
                }
            )
        self._reply({"error": f"not faked: POST {self.path}"}, 404)

    def do_GET(self):
        self._reply({"error": f"not faked: GET {self.path}"}, 404)


@pytest.fixture
def fake_hub(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    import huggingface_hub.constants as c

    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(c, "ENDPOINT", endpoint)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    _FakeHub.commits, _FakeHub.auth, _FakeHub.validated = [], [], []
    yield _FakeHub
    server.shutdown()


def test_push_to_hub_uploads_the_model_directory_with_the_env_token(fake_hub, tmp_path, monkeypatch):
    cfg = load_config(overrides=["--hub.repo_id=me/bco"])
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(hub.HubError, match="HF_TOKEN"):  # no token: said before any work
        hub.check_push_ready(cfg)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "qwen2"}')
    model_card.write_model_card(tmp_path / "model", cfg, FINAL)
    tags = hub.push_model(str(tmp_path / "model"), cfg, "bco-ray run r1")
    assert tags["hub.repo_id"] == "me/bco" and tags["hub.commit"] == "c" * 40
    (commit,) = fake_hub.commits
    assert commit["path"].startswith("/api/models/me/bco/commit/")
    assert set(commit["files"]) == {"config.json", "README.md"}
    assert b"eval/auc" in commit["files"]["README.md"]
    assert len(fake_hub.validated) == 1 and "library_name: transformers" in fake_hub.validated[0]
    assert set(fake_hub.auth) == {"Bearer hf_test_token"}


# ---------------------------------------------------------------------------- nothing executable loaded
def test_embedding_func_is_loaded_only_as_the_trainer_wrote_it(tmp_path):
    import cloudpickle

    from bco_ray.data.fingerprint import fingerprint_path

    udm = tmp_path / "inputs" / "udm"
    udm.mkdir(parents=True)
    tmp = udm / "tmp.pkl"
    tmp.write_bytes(cloudpickle.dumps({"func": len, "tokenizer": None}))
    good = udm / f"embedding_func-{fingerprint_path(str(tmp))[:16]}.pkl"
    tmp.rename(good)
    assert load_embedding_func(str(good))["func"] is len
    cases = {
        "memory://bucket/udm/" + good.name: "does not exist",  # a URI: checked the same way
        str(tmp_path / "x.pkl"): "is not an inputs/udm/embedding_func-<hash>.pkl",
        str(udm / ("embedding_func-" + "0" * 16 + ".pkl")): "does not exist",
    }
    for path, message in cases.items():
        with pytest.raises(EmbeddingFuncError, match=message):
            check_embedding_func(path)
    good.write_bytes(cloudpickle.dumps({"func": print, "tokenizer": None}))  # replaced after it was written
    with pytest.raises(EmbeddingFuncError, match="changed after it was written"):
        load_embedding_func(str(good))


@pytest.mark.parametrize(
    "override,message",
    [
        ("--mlflow.run_name=../up", "mlflow.run_name '../up' becomes a directory name"),
        ("--mlflow.registered_model_name=a/../b", "mlflow.registered_model_name 'a/../b'"),
        ("--hub.repo_id=../../etc", "hub.repo_id '../../etc' must look like org/name"),
        ("--hub.repo_id=just-a-name", "hub.repo_id 'just-a-name' must look like org/name"),
        ("--hub.revision=refs/pr/1", "hub.revision 'refs/pr/1'"),
    ],
)
def test_names_that_become_paths_or_repos_are_checked(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(overrides=[override])


# ---------------------------------------------------------------------------------------- run tags
def test_git_commit_is_taken_at_submit_time_first(monkeypatch):
    from bco_ray.tracking import run_tags

    monkeypatch.delenv("BCO_RAY_GIT_COMMIT", raising=False)
    monkeypatch.setenv(
        "RAY_JOB_CONFIG_JSON_ENV_VAR",
        json.dumps({"metadata": {"job_submission_id": "raysubmit_1", "git_commit": "b" * 40}}),
    )
    assert run_tags.git_commit() == ("b" * 40, "job_metadata")  # ray job submit --metadata-json
    monkeypatch.setenv("BCO_RAY_GIT_COMMIT", "a" * 40)  # -- BCO_RAY_GIT_COMMIT=$(git rev-parse HEAD)
    tags = run_tags.git_tags()
    assert tags["git_commit"] == "a" * 40 and tags["git_commit.source"] == "env" and "git_dirty" not in tags
    monkeypatch.delenv("BCO_RAY_GIT_COMMIT")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    monkeypatch.setattr(run_tags, "_git", lambda *a: None)  # a working dir without .git, no env
    assert run_tags.git_commit() == (None, None) and run_tags.git_tags() == {}
