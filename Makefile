# Set-up and entry points. Each target creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# segmentation_models_pytorch needs torchvision, whose PyPI build imports only beside a
# matching torch build: its tests run in a venv of their own.
SMP_VENV := .venv-smp
SMP_STAMP := $(SMP_VENV)/.installed

.PHONY: demo test test-smp test-all lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU build of torch first: a bare requirement may pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0 \
		|| $(PY) -m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/haloseg demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not smp"
	$(MAKE) test-smp

$(SMP_STAMP): pyproject.toml
	$(PYTHON) -m venv $(SMP_VENV)
	$(SMP_VENV)/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(SMP_VENV)/bin/python -m pip install -q -e ".[smp]" pytest monai
	touch $(SMP_STAMP)

test-smp: $(SMP_STAMP)
	$(SMP_VENV)/bin/python -m pytest -q -m smp tests/test_registry.py tests/test_model_target.py

test-all: $(STAMP)
	$(PY) -m pytest -q -m "not smp"
	$(MAKE) test-smp

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

bench: $(STAMP)
	$(VENV)/bin/haloseg bench spatial --json docs/bench-spatial.json

clean:
	rm -rf $(VENV) $(SMP_VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
