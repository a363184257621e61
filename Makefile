# Plain runner. `make demo` and `make test` do all set-up on a fresh machine (Python >= 3.11 and pip needed).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
EXTRAS ?= dev,sevenn
STAMP  := $(VENV)/.installed-$(EXTRAS)

export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export OPENBLAS_NUM_THREADS ?= 1

.PHONY: install test test-all demo demo-data sisn-data lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned to the CPU build (any other request pulls GBs of CUDA packages); the rest keep it.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

demo: $(STAMP)
	$(VENV)/bin/mfhull demo

# Regenerate data/demo with GPAW (optional `dft` extra; Debian packages + GPAW build, see scripts/install_dft.sh).
# Resumable: stopping and re-running continues where it stopped.
demo-data: $(STAMP)
	bash scripts/install_dft.sh
	OMP_NUM_THREADS=1 $(PY) -m pipeline.label.demo_set

# Grow / resume data/sisn (Si-Sn PBE + r2SCAN, see data/sisn/README.md); STOP_AT=HH:MM (UTC) ends it politely.
STOP_AT ?=
sisn-data: $(STAMP)
	bash scripts/install_dft.sh
	OMP_NUM_THREADS=1 nice -n 19 $(PY) -m pipeline.label.sisn_set $(if $(STOP_AT),--stop-at $(STOP_AT))

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline flows tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .prefect
