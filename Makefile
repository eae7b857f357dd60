# msgate: two commands on a fresh machine (see README):
#   make run    install, then run msgate on the embedded defaults (SQLite, local blobs, embedded queue)
#   make test   install (Python packages, DCMTK, Orthanc), then run every test
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install sysdeps run test test-fast bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# constraints.txt pins the whole tree; torch==2.13.0 resolves to the machine's local CPU wheel
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

sysdeps:
	@scripts/sysdeps.sh

run: install
	MSGATE_HOME=$${MSGATE_HOME:-./var} $(VENV)/bin/msgate serve

test: install sysdeps
	@scripts/services.sh
	$(PY) -m pytest -m "" -p no:cacheprovider tests

test-fast: install
	$(PY) -m pytest -m "not slow and not peer" tests

bench: install sysdeps
	$(PY) bench/storage.py

clean:
	rm -rf $(VENV) var .pytest_cache
