# One-command setup: every target below creates .venv on first use and installs the package with its test
# extras under constraints.txt (the pinned torch trio), so a fresh clone needs nothing but python3 and pip.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
DEMO_OUT ?= outputs/demo
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false

.PHONY: setup test test-slow test-all lint format demo clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --progress-bar off --disable-pip-version-check -c constraints.txt -e '.[test]'
	@touch $(STAMP)

setup: $(STAMP)

# Default tier: fast unit tests (the `slow` marker is deselected in pyproject.toml).
test: $(STAMP)
	$(PY) -m pytest -q

# Longer end-to-end runs only.
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check mmalign tests scripts

format: $(STAMP)
	$(VENV)/bin/ruff check --fix mmalign tests scripts

demo: $(STAMP)
	$(VENV)/bin/mmalign demo --out $(DEMO_OUT)

clean:
	rm -rf $(VENV) outputs .pytest_cache *.egg-info
