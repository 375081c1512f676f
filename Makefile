# Two commands do all the set-up: `make train` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: setup dev-setup train test lint clean

# What the trainers need; constraints.txt pins the tested versions.
setup: $(VENV)/.installed

# Also the test tools and the tfds extra (TensorFlow's CPU build, 1.3 GB), which the tests need
# to prove the tfds data source equal to the IDX files.
dev-setup: $(VENV)/.installed-dev

# Recreated when the dependencies change.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

train: setup
	$(BIN)/python -m torch_ref.train $(ARGS)

test: dev-setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: dev-setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
