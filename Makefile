# alignrl: every target installs what it needs first (into .venv), so a fresh clone needs only `make`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel on these machines; on a GPU box set TORCH to the build you want (make TORCH=torch==2.13.0 ...).
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.alignrl-installed
# DeepSpeed ships as a source package that builds against the torch above (hence --no-build-isolation)
DEEPSPEED ?= deepspeed==0.19.8

.PHONY: install run test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"   # first, so nothing below pulls another torch build
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-build-isolation "$(DEEPSPEED)"   # distributed=zero2|zero3 (tests/test_zero.py)
	DS_ACCELERATOR=cpu $(BIN)/python -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load()" >/dev/null   # its CPU op, built once now rather than in the first test
	touch $(STAMP)

install: $(STAMP)

# The main job on the built-in CPU default: Flow-GRPO on a tiny SD3 (about a minute on 2 cores).
run: install
	$(BIN)/alignrl train $(ARGS)

test: install
	$(BIN)/python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder --durations=15 $(PYTEST_ARGS)   # one worker per core, a file per worker, slowest files first (tests/conftest.py); the 15 slowest listed

bench: install
	$(BIN)/python scripts/bench_rollout.py

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
