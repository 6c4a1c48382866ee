# Two commands on a fresh machine: `make test` and `make demo` set up .venv themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: help setup test test-slow demo bench docs docs-serve clean

help:  ## list the documented targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test,onnx,docs]'
	touch $(STAMP)

setup: $(STAMP)  ## create .venv with the pinned versions (constraints.txt)

test: $(STAMP)  ## fast test suite (about 2 minutes on 2 CPU cores; README "Development")
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)  ## end-to-end tests marked slow
	$(BIN)/python -m pytest -q -m slow

demo: $(STAMP)  ## synthetic dataset -> train -> eval -> detect, on the CPU
	$(BIN)/python scripts/demo.py

bench: $(STAMP)  ## SPP-net vs R-CNN speed table, the paper's ZF-5 (writes bench.json)
	$(BIN)/spp-det bench '~experiment'   # the paper's model group values (ZF-5, fc 4096), not the CPU recipe's

docs: $(STAMP)  ## build the documentation site (docs/, mkdocs.yml) into site/; a broken link fails
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d site

docs-serve: $(STAMP)  ## serve the documentation site at http://127.0.0.1:8000, rebuilt on every edit
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

clean:  ## remove the virtual environment and caches (keeps data/ and runs/)
	rm -rf $(VENV) .pytest_cache site
