# Two entry points: `make demo` (install + default decomposition) and `make test` (install + tests).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt
STAMP := $(VENV)/.installed

.PHONY: demo test install lint bench clean browser

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PIP) -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# a second `make demo` shows the finished run again, or continues an interrupted one
demo: $(STAMP)
	@if [ -f runs/demo/summary.json ]; then $(VENV)/bin/spdkit eval runs/demo; \
	elif [ -f runs/demo/config.yaml ]; then $(VENV)/bin/spdkit resume runs/demo; \
	else $(VENV)/bin/spdkit run tms_5-2 --out runs/demo; fi

test: $(STAMP) browser
	$(PY) -m pytest -q --durations=15

# the report's browser tests drive Debian's Chromium; installed here when we can (root + apt)
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && { apt-get install -y -qq chromium >/dev/null 2>&1 \
	       || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null 2>&1; }; }; } \
	  || echo "note: Debian's 'chromium' package is missing: the headless-browser tests will skip"

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) benchmarks/bench_step.py

clean:
	rm -rf $(VENV) runs
