# The two commands: `make run` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
CONFIG ?= config.yaml
MODELS_DIR ?=
# Test processes (pytest-xdist, a test module per process): most of the suite waits on servers,
# subprocesses and sockets, so two processes take ~22 min where one took ~35 on 2 cores.
TEST_WORKERS ?= 2

.PHONY: run test venv sysdeps-run sysdeps-test tiny-models samples bench clean

$(VENV)/.installed: requirements.txt requirements-nodeps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	touch $@

venv: $(VENV)/.installed

# Debian packages (Tesseract, fonts, ...): installed when missing as root or with passwordless
# sudo; otherwise one line says what to install and the features (and tests) that need them are off.
sysdeps-run:
	@bash scripts/system_deps.sh run

sysdeps-test:
	@bash scripts/system_deps.sh test

run: sysdeps-run $(VENV)/.installed
	$(PY) api.py --host $(HOST) --port $(PORT) --config $(CONFIG) $(if $(MODELS_DIR),--models-dir $(MODELS_DIR))

test: sysdeps-test $(VENV)/.installed
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

tiny-models: $(VENV)/.installed
	$(PY) scripts/make_tiny_models.py $(or $(MODELS_DIR),tiny_models)

samples: $(VENV)/.installed
	$(PY) scripts/make_samples.py

clean:
	rm -rf .pytest_cache tiny_models
