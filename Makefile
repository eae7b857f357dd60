# msgate: two commands on a fresh machine (see README):
#   make demo   install, then run the embedded all-in-one demo (msgate demo)
#   make test   install (Python packages, DCMTK, Orthanc, dicom3tools, tmux), then run every test
# Also: make run (msgate serve on the embedded defaults), make test-fast, make bench.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install sysdeps demo run test test-fast bench model model-lesions model-rims model-patient clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# constraints.txt pins the whole tree; torch==2.13.0 resolves to the machine's local CPU wheel
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

sysdeps:
	@scripts/sysdeps.sh

demo: install
	$(VENV)/bin/msgate demo --out demo-out

run: install
	MSGATE_HOME=$${MSGATE_HOME:-./var} $(VENV)/bin/msgate serve

# Test files run in TEST_WORKERS pytest-xdist processes (a file stays in one process: its module fixtures,
# servers and ports are its own); most tests wait on sockets and child processes, so 3 fit 2 cores.
# TEST_WORKERS=0 runs them in this process, one after another.
TEST_WORKERS ?= 3

test: install sysdeps
	@scripts/services.sh
	$(PY) -m pytest -m "" -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile tests

test-fast: install
	$(PY) -m pytest -m "not slow and not peer" tests

bench: install sysdeps
	$(PY) bench/storage.py
	$(PY) bench/dicom_ingest.py
	$(PY) bench/hl7_feed.py

# Train the models from scratch on the synthetic cohort (CPU, tiny presets) into var/models/.
# model-lesions trains every part of the lesion model (Rim+ training code 0.2.0, the default);
# model-rims retrains only the Rim+ nets on the packaged segmenter, which is how the shipped
# lesions-tiny.pt was made (docs/lesion-model.md). model-patient reproduces the shipped patient-tiny.pt
# (it uses the packaged lesion checkpoint as its lesion source, as the shipped model does); see
# docs/model-card.md.
model: model-lesions model-patient

model-lesions: install
	$(VENV)/bin/msgate train lesions --preset tiny --out var/models/lesions-tiny.pt

model-rims: install
	$(VENV)/bin/msgate train lesions --preset tiny --rim-only --seed 0 --threads 2 --out var/models/lesions-tiny.pt

model-patient: install
	nice -n 19 $(VENV)/bin/msgate train patient --preset tiny --synthetic 650 --seed 101 --workers 2 \
		--out var/models/patient-tiny.pt

clean:
	rm -rf $(VENV) var .pytest_cache
