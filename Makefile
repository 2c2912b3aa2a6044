# Every target installs what it needs into .venv first (torch from the local wheel cache where pip has one).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= runs/demo

.PHONY: install demo test test-slow bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

## demo: the main job on the embedded default (synthetic data, models, two-pass flow, report)
demo: install
	$(VENV)/bin/twopass demo --out $(OUT)

## test: the default suite (CI runs this)
test: install
	$(PY) -m pytest -q

## test-slow: the tests marked slow (minutes each)
test-slow: install
	$(PY) -m pytest -q -m slow

## bench: every benchmark script, each ending in its name=value line
bench: install
	for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf runs .pytest_cache
