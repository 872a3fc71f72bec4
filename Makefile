# Set-up and entry points. `make demo` and `make test` work on a fresh machine: they create .venv when missing,
# install the project with the right extras, make torchvision import on CPU-only machines, then run.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
REA2SEG := $(VENV)/bin/rea2seg
# GPU nodes get CUDA torch + vLLM; everything else the CPU build of both.
EXTRAS ?= $(if $(shell command -v nvidia-smi 2>/dev/null),gpu,cpu),train,dev
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast lint format tiny-models proving-ground clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/fix_torchvision_cpu.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	$(PY) scripts/fix_torchvision_cpu.py
	@touch $@

tiny-models: setup
	$(REA2SEG) build-tiny-models

# The main job on its embedded default: local Ray, the bundled sample scenes, tiny models, output under outputs/.
demo: tiny-models
	$(REA2SEG) segment
	@echo "demo: the tiny models are random-init, so these numbers say nothing of quality; see the run in" \
	  "outputs/segment/gallery/index.html, and 'make proving-ground' for a scorer that learns."

# Train a tiny scorer from scratch (20 min of training, ~28 min in all on 2 CPU cores), serve it in the segmentation job, compare with the
# untrained scorer on held-out scenes: outputs/proving-ground/summary.md (README "Proving ground").
proving-ground: tiny-models
	rm -rf outputs/proving-ground
	$(PY) scripts/proving_ground.py --out outputs/proving-ground

test: setup
	$(VENV)/bin/ruff check rea2seg_ray tests scripts bench cluster jobs
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check rea2seg_ray tests scripts bench cluster jobs
	$(VENV)/bin/ruff format --check rea2seg_ray tests scripts bench cluster jobs

format: setup
	$(VENV)/bin/ruff format rea2seg_ray tests scripts bench cluster jobs
	$(VENV)/bin/ruff check --fix rea2seg_ray tests scripts bench cluster jobs

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
