# `make test`: set up .venv (CPU torch when no CUDA) and run the test suite.
# `make demo`: same setup, then the whole pipeline on the built-in demo corpus.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_BASE ?= $(CURDIR)/demo_base

.PHONY: setup test demo clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Install CPU torch first where there is no NVIDIA driver, so that resolving our
# dependencies does not pull several GB of CUDA wheels.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		$(PY) -m pip install -q torch; \
	else \
		$(PY) -m pip install -q torch==2.13.0 || $(PY) -m pip install -q torch; \
	fi
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests

demo: $(STAMP)
	$(PY) -m nanochat_unsloth.demo --base-dir $(DEMO_BASE)

clean:
	rm -rf $(DEMO_BASE) .pytest_cache
