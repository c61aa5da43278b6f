# Every target sets itself up on a fresh clone: the first run creates .venv and installs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fusionkit-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test lint bench bench-gpu bench-report bench-preset gpu-check docs docs-serve \
	clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch and torchvision first, pinned: these builds lie on local disk.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev,docs]'
	touch $(STAMP)

demo: setup
	$(PY) -m fusionkit.demo

# ruff, then the import contracts of pyproject.toml: layers point down, no import cycles.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest -q

BENCH_FLAGS := -q -p no:cacheprovider --benchmark-enable --benchmark-columns=median,min,iqr,rounds
# On a shared CPU machine, wait up to this many seconds before each case for other processes to
# go idle (cases timed while others were busy are marked in the report either way).
BENCH_QUIET_WAIT ?= 60

# CPU, reduced grid, 2 torch threads: a few minutes.
bench: setup
	mkdir -p .benchmarks
	$(PY) -m pytest benchmarks $(BENCH_FLAGS) --bench-device=cpu --bench-threads=2 \
		--bench-quiet-wait=$(BENCH_QUIET_WAIT) --benchmark-json=.benchmarks/cpu.json
	$(MAKE) bench-report

# CUDA, full grid (xformers, sdpa and math; bf16 and fp32).
bench-gpu: setup
	mkdir -p .benchmarks
	$(PY) -m pytest benchmarks $(BENCH_FLAGS) --bench-device=cuda \
		--benchmark-json=.benchmarks/gpu.json
	$(MAKE) bench-report

# Everything to check on a CUDA GPU, in at most 8 minutes: the CUDA tests (real xformers against
# math), a short bf16 training run of the quickstart on xformers, the benchmarks on the reduced
# grid; logs, JSON and reports into gpu-check/ (docs/gpu.md). Without CUDA it stops at once,
# before any setup.
gpu-check:
	@$(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m benchmarks.gpu_check --preflight
	@$(MAKE) --no-print-directory setup
	$(PY) -m benchmarks.gpu_check

# The zero-config command on emoji, timed on 2 CPU cores from an empty feature cache against its
# 15-minute budget (docs/results/default_preset.md); 3 rounds of about 3 minutes each here.
bench-preset: setup
	$(PY) -m benchmarks.default_preset

# One report from every run present (CPU and GPU side by side).
bench-report: setup
	@test -n "$(wildcard .benchmarks/cpu.json .benchmarks/gpu.json)" || \
		{ echo "no .benchmarks/cpu.json or gpu.json: run make bench or make bench-gpu" >&2; exit 1; }
	$(PY) -m benchmarks.report $(wildcard .benchmarks/cpu.json .benchmarks/gpu.json) \
		--out docs/benchmarks

docs: setup
	$(VENV)/bin/mkdocs build --strict

docs-serve: setup
	$(VENV)/bin/mkdocs serve -a 127.0.0.1:8000

clean:
	rm -rf $(VENV) site .pytest_cache .benchmarks
