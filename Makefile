# keras-decoder: the two commands are `make lab` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
KERAS_BACKEND ?= tensorflow
export TF_CPP_MIN_LOG_LEVEL ?= 3

.PHONY: install lab test test-backend bench exercises clean

## install: create .venv and install .[course,test] (editable); re-runs only when pyproject.toml changed.
install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[course,test]'
	@touch $(STAMP)

# Jupyter refuses to run as root without --allow-root (containers, CI machines).
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)

## lab: JupyterLab opened on lessons/, with exercises/ beside it (KERAS_BACKEND=jax make lab picks the backend).
lab: install
	KERAS_BACKEND=$(KERAS_BACKEND) $(VENV)/bin/jupyter lab --ServerApp.root_dir=. --LabApp.default_url=/lab/tree/lessons $(ALLOW_ROOT) $(LAB_ARGS)

## test: the whole suite once per backend, each in its own process.
test: install
	@$(PY) scripts/test_all_backends.py

## bench: ratio benchmarks against baselines measured in the same process.
bench: install
	@for b in tensorflow jax torch; do \
	  for f in benchmarks/*.py; do KERAS_BACKEND=$$b $(PY) $$f || exit 1; done; \
	done

## exercises: regenerate the learner notebooks from exercises/source/.
exercises: install
	$(VENV)/bin/keras-decoder exercises build

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
