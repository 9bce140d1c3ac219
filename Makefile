# Two commands for a fresh machine:  make run   (set up + main job)   make test   (set up + tests)
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run test clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup_system.sh
	bash scripts/setup_system.sh
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# The main job on embedded defaults: render the paper's dMelodies dataset (skipped when it is
# already there), run the quick robustness grid (the four models, z_dim 32) on a local Ray, write
# the report (results/quick/report.html) and say what it shows.
run: setup
	$(PY) -m data_prep.dmelodies data/dmelodies
	$(PY) tune/robustness_sweep.py --grid quick --data data/dmelodies

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf runs mlflow.db mlruns results
