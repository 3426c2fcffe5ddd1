# Two entry points: `make demo` (install + default decomposition) and `make test` (install + tests).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt
STAMP := $(VENV)/.installed

.PHONY: demo test install lint bench clean

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

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) benchmarks/bench_step.py

clean:
	rm -rf $(VENV) runs
