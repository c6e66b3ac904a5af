# Two commands do all set-up on a fresh machine:  make demo  |  make test
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0

.PHONY: demo test test-fast lint fmt setup clean

# Byte-compiled at install time: only the modules a job's processes import (pip would compile every module of
# every package, most never imported: about 1.5 min on 2 cores). Written even where PYTHONDONTWRITEBYTECODE is set,
# so that each Ray worker does not compile torch, transformers and DeepSpeed again when it starts.
WARM := bco_ray.cli, bco_ray.job.run, bco_ray.job.online, bco_ray.train.loop, bco_ray.train.online_loop, \
	bco_ray.precompute.stages, bco_ray.online.rollout, deepspeed, ray.train.torch, ray.data, ray.dashboard, \
	sklearn.linear_model, matplotlib.pyplot, mlflow.server, transformers.models.qwen2.modeling_qwen2, \
	transformers.models.bert.modeling_bert, peft, pytest

$(VENV)/.installed: pyproject.toml bco_ray/__init__.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU-only machines get the CPU build of torch first, so the project's `torch` requirement does not
	# pull several GB of CUDA wheels; machines with an NVIDIA driver get the default (CUDA) build.
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  $(PY) -m pip install -q --no-compile torch; \
	else \
	  $(PY) -m pip install -q --no-compile torch==$(TORCH_VERSION) || \
	  $(PY) -m pip install -q --no-compile torch==$(TORCH_VERSION) --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(PY) -m pip install -q --no-compile -e ".[dev]"
	env -u PYTHONDONTWRITEBYTECODE $(PY) -c "import $(WARM)"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) jobs/bco.py

test: setup
	$(PY) -m pytest -q --timeout=1200 tests

# The edit loop: the unit tests (math, data, config, API, tracking), lint and layers; no Ray job, no DeepSpeed ranks.
test-fast: setup
	$(PY) -m pytest -q --timeout=600 -m "not e2e and not slow" tests

# ruff, configured in pyproject.toml: `lint` checks (the fast tier runs it too), `fmt` fixes imports and formats.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

fmt: setup
	$(VENV)/bin/ruff check --fix --select I .
	$(VENV)/bin/ruff format .

clean:
	rm -rf outputs mlflow.db .pytest_cache
