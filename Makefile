# Two commands do all set-up on a fresh machine: `make demo` (the main job) and `make test`.
# Each creates .venv, installs the CPU torch wheel (torch==2.13.0, so no CUDA wheels are pulled),
# installs structlin with its dev extras, and fetches the offline assets (DESIGN §5) into
# $STRUCTLIN_CACHE (default ~/.cache/structlin). Fetching is idempotent and verified.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.structlin-installed
PYTEST_ARGS ?=

.PHONY: demo test assets install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

assets: $(STAMP)
	$(BIN)/python -m structlin.assets fetch

demo: assets
	$(BIN)/structlin demo

test: assets
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
