# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The demo needs PyTorch (extra "torch"); the tests also need ONNX export and runtime
# (extras "export" and "onnx"), all in extra "all".
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[torch,demo]'
	touch $@

# Meta's sam2 (the reference for SAM 2-style decoders) asks for torchvision, which cannot
# load beside the CPU torch: installed without its dependencies (those it needs at import
# are in the test extra), built against the installed torch, without its CUDA extension.
$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[all,test]'
	SAM2_BUILD_CUDA=0 $(BIN)/pip install -q --no-deps --no-build-isolation sam2==1.1.0
	touch $@

# The browser tests drive Debian's Chromium (a test tool's own browser download is not
# possible everywhere); installing it needs root, as in CI.
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

demo: $(STAMP)
	$(BIN)/python -m segany.demo

test: $(TEST_STAMP) $(CHROMIUM)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q --durations=15

clean:
	rm -rf $(VENV) demo-output
