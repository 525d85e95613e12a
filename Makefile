# Two commands set up everything on a fresh machine:
#   make demo   - create .venv, install cmd-fgvc with its extras, run the default pretraining example
#   make test   - create .venv, install cmd-fgvc with its extras, run ruff and the test suite
# VENV can point elsewhere (CI uses a temporary folder); TORCH pins the PyTorch build to install.

VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.cmd-fgvc-installed
PYTEST_ARGS ?=

.PHONY: install demo test lint docs bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[dev,viz,docs]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cmd-fgvc pretrain --knn_every 1 --supervised_reference

lint: $(STAMP)
	$(VENV)/bin/ruff check cmd tests examples benchmarks _hook

test: $(STAMP) lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

bench: $(STAMP)
	$(PY) benchmarks/bench_losses.py
	$(PY) benchmarks/bench_train_step.py

clean:
	rm -rf $(VENV) build dist site .pytest_cache .ruff_cache
