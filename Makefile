# One-command set-up and runs. `make demo` and `make test` create .venv, install torch and the
# package with the extras the tests need, then run; a second call skips the installs.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned here (not in pyproject.toml): a CPU wheel on machines without a GPU, the
# CUDA build of the same release on machines with one.
TORCH_VERSION ?= 2.13.0
# extras installed for the tests; modalities add theirs here (never `data`, which downloads)
EXTRAS ?= dev,images,molecules
EMPTY :=
SPACE := $(EMPTY) $(EMPTY)
COMMA := ,
STAMP := $(VENV)/.installed-$(subst $(SPACE),,$(subst $(COMMA),-,$(EXTRAS)))-torch$(TORCH_VERSION)

.PHONY: setup demo test bench clean distclean

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml Makefile | $(PY)
	$(PY) -m pip install "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -e ".[$(EXTRAS)]"
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/multidiff sample digits -n 100 --labels all --nfe 20 --picture --out out/demo/digits
	OMP_NUM_THREADS=1 $(PY) -m multidiff.demo --out out/demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

bench: $(STAMP)
	$(PY) benchmarks/samplers.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/images.py --checkpoint digits

clean:
	rm -rf out build dist *.egg-info .pytest_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
