# Two commands do all set-up on a fresh machine:  make demo  |  make test
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0

.PHONY: demo test test-fast lint fmt setup clean

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
	# Byte-compiled once, every module, on all cores (pip compiles them one at a time: about 1.5 min on 2 cores).
	# Every process a job starts imports torch, transformers, Ray and DeepSpeed, and where PYTHONDONTWRITEBYTECODE
	# is set, a module without its .pyc is compiled again in each. A few files are written for newer Pythons and do
	# not compile; pip skips them too.
	$(PY) -m compileall -q -j 0 $$($(PY) -c "import sysconfig as s; print(*sorted({s.get_path('purelib'), s.get_path('platlib')}))") bco_ray >/dev/null || true
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
