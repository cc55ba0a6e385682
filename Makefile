# Set up the environment once (.venv, pinned by requirements.lock), then run the demo or the tests.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export DVC_NO_ANALYTICS := 1

.PHONY: demo test bench lock clean

$(BIN)/viclip: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet uv
	$(BIN)/uv pip install --python $(BIN)/python --quiet -r requirements.lock
	$(BIN)/uv pip install --python $(BIN)/python --quiet --no-deps -e .
	touch $@

demo: $(BIN)/viclip
	$(BIN)/viclip demo --workdir demo-run

test: $(BIN)/viclip
	$(BIN)/python -m pytest

# Every stage against the reference implementation, at full model size (BENCHMARKS.md).
bench: $(BIN)/viclip
	$(BIN)/python -m benchmarks

# Re-pin every dependency after changing pyproject.toml.
lock:
	$(BIN)/uv pip compile pyproject.toml --extra test --quiet -o requirements.lock

clean:
	rm -rf $(VENV) demo-run
