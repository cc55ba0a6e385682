# Set up the environment once (.venv, pinned by requirements.lock), then run the demo or the tests.
# A supported CPython that is here (3.11 to 3.13, the oldest first); requirements.lock resolves for each.
ifndef PYTHON
PYTHON := $(shell for p in python3.11 python3.12 python3.13 python3; do \
	$$p -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 13))' 2>/dev/null && { echo $$p; break; }; done)
endif
VENV := .venv
BIN := $(VENV)/bin
export DVC_NO_ANALYTICS := 1

.PHONY: demo test bench gpu-check lock clean

# The dependencies' bytecode is compiled at install: every viclip process (each DVC stage, each test's
# subprocess) would otherwise compile torch, transformers and open_clip anew wherever bytecode is not
# written (PYTHONDONTWRITEBYTECODE set, a read-only tree): about 10 s a process on 2 cores.
$(BIN)/viclip: requirements.lock pyproject.toml
	@test -n "$(PYTHON)" || { echo "no Python 3.11, 3.12 or 3.13 found: install one, or name it: make PYTHON=..." >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet uv
	$(BIN)/uv pip install --python $(BIN)/python --quiet --compile-bytecode -r requirements.lock
	$(BIN)/uv pip install --python $(BIN)/python --quiet --no-deps -e .
	touch $@

demo: $(BIN)/viclip
	$(BIN)/viclip demo --workdir demo-run

# Two workers: most tests wait on one thread (a fresh process importing torch, DVC); each test's own
# training still uses every core. tests/conftest.py builds the demo once for both. Tests are handed out a
# few at a time: the slow ones come early (conftest), and in xdist's default chunks the first worker got them all.
test: $(BIN)/viclip
	$(BIN)/python -m pytest -n 2 --maxschedchunk 1

# Every stage against the reference implementation, at full model size (BENCHMARKS.md).
bench: $(BIN)/viclip
	$(BIN)/python -m benchmarks

# On a GPU machine with a stock PyTorch image and no venv (README: "Checking a GPU"): the CUDA tests
# (tests/gpu: extract, train and decode on CUDA against the CPU), then the extract, train and decode
# benchmarks. Both run, whichever fails; results are written as they come. Dependencies come from
# PYTHONPATH (the wheels README.md's "Checking a GPU" downloads), the repository root put in front of them.
GPU_PYTHON ?= python3
GPU_RESULTS ?= artifacts/gpu-check
GPU_BENCH_OUT ?= benchmarks/results/gpu-$(shell date +%Y-%m-%d).json

gpu-check: SHELL := /bin/bash
gpu-check:
	mkdir -p $(GPU_RESULTS) $(dir $(GPU_BENCH_OUT))
	export PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" HF_HUB_OFFLINE=1; \
	$(GPU_PYTHON) -m pytest -x -v -s -rA --junitxml=$(GPU_RESULTS)/tests.xml tests/gpu 2>&1 | tee $(GPU_RESULTS)/tests.log; \
	tests=$${PIPESTATUS[0]}; \
	$(GPU_PYTHON) -m benchmarks --only extract train decode profile --out $(GPU_BENCH_OUT) 2>&1 | tee $(GPU_RESULTS)/benchmarks.log; \
	bench=$${PIPESTATUS[0]}; \
	echo "gpu-check: tests exit $$tests, benchmarks exit $$bench; $(GPU_RESULTS)/, $(GPU_BENCH_OUT)"; \
	[ $$tests -eq 0 ] && [ $$bench -eq 0 ]

# Re-pin every dependency after changing pyproject.toml, for every supported Python (3.11 and up).
lock:
	$(BIN)/uv pip compile pyproject.toml --extra test --universal --python-version 3.11 --quiet -o requirements.lock

clean:
	rm -rf $(VENV) demo-run
