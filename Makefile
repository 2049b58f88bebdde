# Every target sets itself up first: a fresh machine needs only python3, make and this repo.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.steward-installed
export RAY_USAGE_STATS_ENABLED := 0
export DS_ACCELERATOR := cpu
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast bench lint

setup: $(STAMP)

# torch is pinned and installed first: an unpinned torch would pull a multi-GB CUDA build.
# haproxy (a Debian package) lets Ray Serve run its high-throughput ingress; without it Serve uses its default proxy.
$(STAMP): pyproject.toml
	command -v haproxy >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q haproxy) \
		|| echo "haproxy not installed: Ray Serve will use its default (slower) proxy"
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/steward run jobs/quickstart.yaml --no-serve

test: lint
	$(BIN)/pytest -q --timeout 1500 --durations=15

test-fast: setup
	$(BIN)/pytest -q -m "not slow"

# Every benchmark, each side by side with its baseline; results (JSON, and tables for the steward bench jobs) land
# in benchmarks/results/. ~40 minutes on 2 quiet cores; benchmarks/README.md has the latest numbers. train_overhead
# runs its judged cells only: ZeRO-3, and memory per worker against the ZeRO formula, come from bench-zero.
bench: setup
	$(BIN)/steward bench jobs/bench-zero.yaml --set output_dir=benchmarks/runs
	$(BIN)/steward bench jobs/bench-serve.yaml --set output_dir=benchmarks/runs
	for job in bench-zero bench-serve; do latest=$$(ls -d benchmarks/runs/$$job/*/ | tail -1); \
		cp $$latest/bench.json benchmarks/results/$$job.json; cp $$latest/bench.md benchmarks/results/$$job.md; done
	$(BIN)/python benchmarks/train_overhead.py --models "bert 4x256" --no-memory \
		--cells "torchrun ddp" "steward ddp" "steward zero-1" "steward zero-2"
	$(BIN)/python benchmarks/tune_efficiency.py
	OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 $(BIN)/python benchmarks/monitor_overhead.py
	$(BIN)/python benchmarks/serve_overhead.py

lint: setup
	$(BIN)/ruff check platform tests benchmarks
	$(BIN)/ruff format --check platform tests benchmarks
	$(BIN)/mypy
