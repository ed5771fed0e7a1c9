# The two commands of README: `make demo` (set up everything, run the CPU demo) and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := openmpi-bin libopenmpi-dev numactl libaio-dev slurm-wlm munge espeak-ng librsvg2-bin
PYTEST_ARGS ?=

export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test test-quick clean-demo real-corpus

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	dpkg -s $(APT_PACKAGES) >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES); }
	[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m opt_ds.ops
	touch $@

demo: setup
	$(PY) -m opt_ds.demo

test: setup
	$(PY) -m pytest -q -ra --durations=25 $(PYTEST_ARGS)

test-quick: setup
	$(PY) -m pytest -q -ra -m "not slow" $(PYTEST_ARGS)

# Real pictures with their spoken descriptions (Tux Paint's stamps), for the real-data rows of BENCHMARKS.md
real-corpus: setup
	dpkg -s tuxpaint-stamps-default espeak-ng librsvg2-bin >/dev/null 2>&1 || $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tuxpaint-stamps-default espeak-ng librsvg2-bin
	$(PY) benchmarks/stamps_corpus.py --out .cache/stamps

clean-demo:
	rm -rf demo_data demo_run
