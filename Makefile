# `make run` trains the embedded default; `make test` runs the tests. Both build .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Pinned and installed before anything else: an unpinned torch pulls GB of CUDA wheels.
# On a GPU machine: make venv TORCH="torch==2.x.y --index-url https://download.pytorch.org/whl/cu128"
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: venv run lint test test-fast bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	# DeepSpeed on CPU JIT-compiles its shared-memory collective at first use (a minute or more
	# on 2 cores): build it now, once per venv, rather than inside the first training run.
	DS_ACCELERATOR=cpu $(BIN)/python -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load()"
	touch $(STAMP)

venv: $(STAMP)

run: venv
	$(BIN)/chatsft train configs/tiny.yaml

# The layers (pyproject.toml, [tool.importlinter]) are part of the test.
lint: venv
	$(BIN)/lint-imports

test: venv lint
	$(BIN)/python -m pytest -q --durations=40

test-fast: venv lint
	$(BIN)/python -m pytest -q -m "not slow and not gpu"

clean:
	rm -rf runs .pytest_cache .hypothesis
