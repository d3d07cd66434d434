# Two commands for a fresh machine:  `make demo`  (runs the app)  and  `make test`  (runs the test suite).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test install bench clean

$(VENV)/.installed: pyproject.toml requirements.txt requirements-dev.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -r requirements-dev.txt   # the project, editable, with all extras (pyproject.toml)
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) app.py

test: $(VENV)/.installed
	bash scripts/ensure_chromium.sh
	$(PY) -m pytest -q tests

bench: $(VENV)/.installed
	$(PY) benchmarks/latency.py

clean:
	rm -rf $(VENV) checkpoints .pytest_cache
