# One-command setup: every target below creates .venv on first use and installs the package with its test
# extras under requirements.lock (every transitive dependency pinned), so a fresh clone needs nothing but python3
# and pip, and a dependency never moves under a measured figure. `make lock` regenerates the lock from
# constraints.txt (the torch trio that installs from local wheels) in a throwaway venv.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
DEMO_OUT ?= outputs/demo
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false

.PHONY: setup test test-slow test-all lint format demo clean lock

$(STAMP): pyproject.toml requirements.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --progress-bar off --disable-pip-version-check -c requirements.lock -e '.[all,test]'
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

# Re-pin every dependency at what installs today (only the torch trio held by constraints.txt); review the diff,
# re-run the demos and benchmarks, and commit requirements.lock with the figures it changes.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --progress-bar off --disable-pip-version-check -c constraints.txt -e '.[all,test]'
	{ echo "# Every transitive dependency of mmalign[test], pinned at the versions that installed on $$(date +%F)"; \
	  echo "# (Python $$(.lock-venv/bin/python -c 'import platform; print(platform.python_version())'), $$(uname -m), the torch trio from constraints.txt). make setup/test/demo and CI install under it."; \
	  echo "# Regenerate: make lock   (a throwaway venv, constraints.txt only, then pip freeze; review the diff)."; \
	  .lock-venv/bin/python -m pip freeze --exclude-editable | grep -v '^-e'; } > requirements.lock
	rm -rf .lock-venv
