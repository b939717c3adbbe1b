# dora_cli — every target installs what it needs first (`make setup` is idempotent).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
SMOLLM2 := .cache/models/SmolLM2-135M-Instruct

.PHONY: setup test test-slow test-kill test-dist test-llamacpp test-all demo study bench bench-inference lint fetch-model clean

setup: $(STAMP)

# The CPU build of torch goes in first and alone: a plain `torch` requirement on a
# machine without it can pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip >/dev/null
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0 \
	  || $(BIN)/pip install -q torch --index-url https://download.pytorch.org/whl/cpu
	$(BIN)/pip install -q -e '.[test,lint,bench]'
	touch $(STAMP)

fetch-model: $(SMOLLM2)/config.json

$(SMOLLM2)/config.json: | $(STAMP)
	$(BIN)/python data/fetch_smollm2.py --out $(SMOLLM2)

test: setup
	$(BIN)/python -m pytest -q -x --durations=15

# Real-model tests (SmolLM2-135M on the CPU, ../shared/data): minutes, not seconds.
test-slow: setup fetch-model
	DORA_EVAL_REPORT=bench/results/eval_smollm2.json DORA_LMEVAL_REPORT=bench/results/lm_eval_crosscheck.json \
	  $(BIN)/python -m pytest -q -m slow --durations=0

# SIGKILL at random points and during checkpoint writes; resumed runs must be bitwise identical.
test-kill: setup
	DORA_KILL_REPORT=bench/results/kill_loop.json $(BIN)/python -m pytest -q -m kill --durations=0

# Many processes on the CPU (gloo): DDP, FSDP and DeepSpeed ZeRO 1-3 against one process, resume across
# process counts, user Accelerate configs, torchrun / multi-machine launches (~15 minutes). DeepSpeed is an
# optional extra (pure Python, ~20 s to install; its CPU Adam for offload compiles on first use).
test-dist: setup
	$(BIN)/pip install -q -e '.[deepspeed]'
	DORA_DIST_REPORT=bench/results/dist_equality.json $(BIN)/python -m pytest -q -m dist --durations=0

# llama.cpp itself reads what `dora export` writes: tokenization and 32-token greedy continuations equal ours.
# llama-cpp-python is an optional extra that compiles llama.cpp from source (cmake, a C++ compiler; about
# 20 minutes on 2 busy cores the first time); where it does not build, the target says so and skips.
test-llamacpp: setup fetch-model
	@$(BIN)/python -c "import llama_cpp" 2>/dev/null || $(BIN)/pip install -q -e '.[llamacpp]' || true
	@if $(BIN)/python -c "import llama_cpp" 2>/dev/null; then \
	  $(BIN)/python -m pytest -q -m llamacpp --durations=0; \
	else echo "test-llamacpp: skipped: llama-cpp-python did not build here (pip's output above says why)"; fi

test-all: test test-kill test-dist test-slow

demo: setup fetch-model
	$(BIN)/python -m dora_cli.demo

# The committed study (studies/smollm2_commonsense): LoRA vs DoRA on SmolLM2-135M, learning rates chosen on
# the validation loss, ranks 4 / 8 / 16 x 3 seeds, one full fine-tuning and the Figure 2 analysis. Hours on
# 2 CPU cores; resumable (run it again after an interruption); results in studies/smollm2_commonsense/results.
study: setup fetch-model
	$(BIN)/python studies/smollm2_commonsense/run_study.py

bench: setup fetch-model
	$(BIN)/python bench/bench_adapters.py --model $(SMOLLM2) --out bench/results/adapters.json
	$(BIN)/python bench/bench_e2e.py --model $(SMOLLM2) --out bench/results/e2e.json

# Inference: unmerged DoRA / LoRA decode (batch 1) and loglik (batch 16) speed; dora export's time and peak RSS.
bench-inference: setup fetch-model
	$(BIN)/python bench/bench_inference.py --model $(SMOLLM2) --out bench/results/inference.json

lint: setup
	$(BIN)/ruff check dora_cli tests bench data studies

clean:
	rm -rf $(VENV) .cache runs
