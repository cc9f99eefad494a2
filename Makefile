# Two entry points: `make speedrun` (the whole pipeline on the tiny model) and `make test`.
# Both create .venv if missing. torch comes through a constraints file pinned to the CPU
# build by default; on a GPU machine pick another torch, e.g.
#   make test TORCH_SPEC="torch==2.13.0" PIP_EXTRA="--index-url <your CUDA wheel index>"
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PIP_EXTRA ?=
STAMP := $(VENV)/.installed

.PHONY: setup test test-all lint speedrun bench bench-docs clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	echo "$(TORCH_SPEC)" > $(VENV)/constraints.txt
	$(PY) -m pip install -q $(PIP_EXTRA) -c $(VENV)/constraints.txt "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -q

# ruff with the rules in pyproject.toml (correctness, not style); CI runs it before `make test`
lint: $(STAMP)
	$(PY) -m ruff check .

# pretraining (runs/speedrun), then SFT -> GRPO -> held-out evaluation from it (runs/speedrun-rl);
# a rerun replaces the previous speedruns (only their own files)
speedrun: $(STAMP)
	$(VENV)/bin/nanoseek speedrun --overwrite
	$(VENV)/bin/nanoseek speedrun-rl --model runs/speedrun --overwrite

# every benchmark that needs no checkpoint (bench_rl_algos needs --init: run it with
# `benchmarks/write_results.py --run "bench_rl_algos --init DIR"`), each output kept in
# docs/benchmarks/NAME.json, then docs/benchmarks.md rewritten from them; BENCHES=... picks some
BENCHES ?= bench_model bench_memory_v4 bench_train bench_parallel bench_precision bench_engine bench_grpo bench_agent load_server
bench: $(STAMP)
	$(PY) benchmarks/write_results.py --run $(BENCHES)

# docs/benchmarks.md again from the kept outputs, without running anything
bench-docs: $(STAMP)
	$(PY) benchmarks/write_results.py

clean:
	rm -rf $(VENV) runs .pytest_cache
