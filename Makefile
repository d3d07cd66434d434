# Two commands for a fresh machine:  `make demo`  (runs the app)  and  `make test`  (runs the test suite).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test install bench clean

# torch 2.14.1 for x86_64 is a CUDA build: the venv takes ~6.7 GB. Say so before pip fills the disk half-way.
MIN_FREE_GB := 8

$(VENV)/.installed: pyproject.toml requirements.txt requirements-dev.txt
	@free_gb=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); \
	if [ "$$free_gb" -lt $(MIN_FREE_GB) ]; then \
		echo "make: the virtual environment needs about $(MIN_FREE_GB) GB free (torch with its CUDA libraries);" \
		     "$$free_gb GB free on $$(df -P . | awk 'NR==2 {print $$6}'). Free some space and run make again." >&2; \
		exit 1; \
	fi
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
