# Two commands do all set-up on a fresh machine:
#   make demo   create the virtual environment and run both routes end to end on the bundled
#               example, offline (tiny model built on the spot, local Batch API stand-in)
#   make test   create the virtual environment with the test tools and run every test
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Without an NVIDIA GPU, install the CPU build of torch before the requirements, so pip
# does not pull a CUDA build of several GB (on a GPU machine pip takes the default build).
TORCH_CPU ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test venv dev clean bench

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(PY) -c "import torch" 2>/dev/null; then \
		$(PIP) install --quiet "$(TORCH_CPU)"; fi
	$(PIP) install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PIP) install --quiet -r requirements-dev.txt
	touch $@

venv: $(VENV)/.runtime

dev: $(VENV)/.dev

demo: $(VENV)/.runtime
	$(PY) -m datagen.demo

test: $(VENV)/.dev
	$(PY) -m pytest $(PYTEST_ARGS)

# Only the SLURM tests: job_script.sh submitted with sbatch to a single-node cluster the
# tests bring up (needs root; tests/slurm/cluster.sh installs slurm-wlm and munge if missing).
.PHONY: test-slurm
test-slurm: $(VENV)/.dev
	$(PY) -m pytest tests/test_slurm.py $(PYTEST_ARGS)

# The benchmarks (minutes each at full size; see README "Benchmarks").
bench: $(VENV)/.dev
	$(PY) bench/bench_create_batchinput.py
	$(PY) bench/bench_reformat.py
	$(PY) bench/bench_generate.py

clean:
	rm -rf $(VENV) .pytest_cache demo
