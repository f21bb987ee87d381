# The two commands of the README's quick start. Each creates .venv and installs what it needs on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pytest processes: the suite is mostly single-threaded XLA compilation, so one per core (CI has 2).
JOBS ?= 2
# Bytecode for the project's modules, once, for the hundreds of processes the suite starts: where
# PYTHONDONTWRITEBYTECODE is set (as on the machines that built this) each would compile them again, 0.2-0.4 s.
COMPILE = $(PY) -m compileall -q labram_jax data_prep

.PHONY: demo test test-quick

$(STAMP): setup.cfg pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel of torch first: an unpinned torch would pull several GB of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# braindecode requires torchaudio, which has no release for torch 2.13: install it alone, its other
	# dependencies are pinned in the dev extra, and the test stands in an inert torchaudio.
	$(PY) -m pip install -q --no-deps braindecode==1.8.1
	touch $@

demo: $(STAMP)
	$(VENV)/bin/labram demo --out demo_out

test: $(STAMP)
	$(COMPILE)
	$(PY) -m pytest -q -n $(JOBS) --dist loadgroup --durations=20

test-quick: $(STAMP)
	$(COMPILE)
	$(PY) -m pytest -q -n $(JOBS) --dist loadgroup -m "not slow"
