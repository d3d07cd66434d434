# Two commands for a fresh machine:  `make demo`  (runs the app)  and  `make test`  (runs the test suite).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test install lock drift bench clean

# torch 2.14.1 for x86_64 is a CUDA build: the venv takes ~6.7 GB. Say so before pip fills the disk half-way.
MIN_FREE_GB := 8

$(VENV)/.installed: pyproject.toml requirements.lock requirements-dev.txt
	@free_gb=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); \
	if [ "$$free_gb" -lt $(MIN_FREE_GB) ]; then \
		echo "make: the virtual environment needs about $(MIN_FREE_GB) GB free (torch with its CUDA libraries);" \
		     "$$free_gb GB free on $$(df -P . | awk 'NR==2 {print $$6}'). Free some space and run make again." >&2; \
		exit 1; \
	fi
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -r requirements-dev.txt   # requirements.lock (exact versions) + the project, editable
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) app.py

test: $(VENV)/.installed
	bash scripts/ensure_chromium.sh
	$(PY) -m pytest -q tests

# Refresh the lock on purpose: the newest versions pyproject.toml allows, for every platform, Python 3.11+.
# requirements.lock: everything (make install, CI); requirements.txt: inference + app, the same versions (Space).
# Then run `make test` and `make drift`, and commit pyproject.toml, requirements.lock and requirements.txt together.
UV_COMPILE := $(VENV)/bin/uv pip compile pyproject.toml --universal --python-version 3.11 --custom-compile-command "make lock"
lock: $(VENV)/.installed
	$(UV_COMPILE) --extra dev --upgrade -o requirements.lock
	$(UV_COMPILE) --extra app -c requirements.lock -o requirements.txt

# The newest and the oldest versions pyproject.toml allows, each in a virtualenv of its own: smoke + parity tests.
drift: $(VENV)/.installed
	$(PY) scripts/drift_check.py newest
	$(PY) scripts/drift_check.py lowest

bench: $(VENV)/.installed
	$(PY) benchmarks/latency.py

clean:
	rm -rf $(VENV) checkpoints .pytest_cache .drift
