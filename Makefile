# Two commands do all set-up on a fresh machine:
#   make demo   create the virtual environment and run the main job on the bundled example
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
	mkdir -p demo
	$(PY) create_batchinput.py --input_file examples/prompts.jsonl --id_field id \
		--model_name gpt-4o-mini --output_file demo/batchinput.jsonl

test: $(VENV)/.dev
	$(PY) -m pytest $(PYTEST_ARGS)

# Only the SLURM tests: job_script.sh submitted with sbatch to a single-node cluster the
# tests bring up (needs root; tests/slurm/cluster.sh installs slurm-wlm and munge if missing).
.PHONY: test-slurm
test-slurm: $(VENV)/.dev
	$(PY) -m pytest tests/test_slurm.py $(PYTEST_ARGS)

bench: $(VENV)/.dev
	$(PY) bench/bench_create_batchinput.py

clean:
	rm -rf $(VENV) .pytest_cache demo
