# The two commands of the README: `make demo` and `make test`. Each creates the
# environment (.venv, from the pins in pyproject.toml) when it is missing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Test processes (pytest-xdist). The SLURM cluster's tests and those reading the demo run share one worker
# (tests/conftest.py: one cluster, one demo run); while they wait on SLURM the other worker runs the rest.
TEST_WORKERS ?= 2

.PHONY: demo cellpainting-demo test bench lint rehearsal clean-demo

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,slurm,jax,torch,pretrained]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/moaflow demo --cores 2

cellpainting-demo: $(STAMP)   # five-channel whole fields served and fetched (README: Screens of more than three channels)
	$(BIN)/moaflow demo --configfile config/cellpainting_demo.yaml --cores 2

test: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q -rs --durations=25 -n $(TEST_WORKERS) --dist loadgroup

rehearsal: $(STAMP)   # the study's plate map at full counts on a stand-in (README: Resources for the real study)
	$(BIN)/moaflow rehearse

bench: $(STAMP)
	$(BIN)/moaflow bench-preprocess
	$(BIN)/moaflow bench-feeder

lint: $(STAMP)
	$(BIN)/snakemake --lint --configfile config/demo.yaml

clean-demo:
	rm -rf results/standin results/bbbc021 results/bbbc014 results/standin-cellpainting results/cellpainting
