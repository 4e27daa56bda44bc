# minirlhf: `make demo` runs the bundled task end to end on CPU; `make test` runs the test suite,
# `make test-fast` all of it but the end-to-end runs marked slow; `make lint` is CI's ruff check.
PYTHON ?= python
# torch is pinned here (a CPU build) so that a fresh machine does not pull several GB of CUDA wheels;
# the package itself only asks for a range.
TORCH_PIN ?= torch==2.13.0
TRITON_PIN ?= triton==3.8.0
RUFF_PIN ?= ruff==0.17.6
STAMP := .venv-stamp

.PHONY: setup demo test test-fast test-kernels bench bench-gpu grpo-arith-data grpo-arith lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m pip install -q "$(TORCH_PIN)" "$(TRITON_PIN)"
	$(PYTHON) -m pip install -q -e ".[test,triton]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m minirlhf.demo

# The model, data and loss tests run on the plain torch path; the Triton kernels are checked in a
# second run under the Triton interpreter (TRITON_INTERPRET=1 must be set before triton is imported).
test: $(STAMP)
	$(PYTHON) -m pytest -q tests --ignore=tests/kernels
	$(MAKE) test-kernels

# the suite without the end-to-end runs marked `slow` (and without the kernel run): a minute or two
test-fast: $(STAMP)
	$(PYTHON) -m pytest -q tests --ignore=tests/kernels -m "not slow"

test-kernels: $(STAMP)
	TRITON_INTERPRET=1 $(PYTHON) -m pytest -q tests/kernels

# Speed and memory against transformers / peft / TRL on the real SmolLM2-135M-Instruct (built here once,
# from ../shared, when missing), on whatever machine this is: generation (benchmarks/generate.py), the
# sft / lora / dpo / ppo training steps and the chunked LM-head loss (benchmarks/train_step.py), the
# tokenizer and checkpoint loading. Each script appends its rows to benchmarks/RESULTS.md; the table of
# this run's ratios is printed at the end. Each script also runs alone, one section at a time (--help).
REAL_MODEL ?= /tmp/real/smollm2
SHARED ?= ../shared

$(REAL_MODEL)/config.json:
	PYTHON=$(PYTHON) bash $(SHARED)/real-models/smollm2.sh $(REAL_MODEL)

bench: $(STAMP) $(REAL_MODEL)/config.json
	@$(PYTHON) benchmarks/results.py --mark > .bench-start
	$(PYTHON) benchmarks/generate.py --model $(REAL_MODEL) --section all
	$(PYTHON) benchmarks/train_step.py --model $(REAL_MODEL) --section all
	$(PYTHON) benchmarks/grpo_step.py --model $(REAL_MODEL) --device cpu
	$(PYTHON) benchmarks/rl_memory.py
	$(PYTHON) benchmarks/tokenizer.py
	$(PYTHON) benchmarks/load_memory.py
	@$(PYTHON) benchmarks/results.py --since $$(cat .bench-start); rm -f .bench-start

# Everything only a GPU can tell, in one call: kernel TFLOP/s and memory against SDPA and naive
# cross-entropy, ~1B training MFU, one-GPU FSDP throughput. Each prints a note and exits 0 without CUDA.
bench-gpu: $(STAMP)
	@$(PYTHON) benchmarks/results.py --mark > .bench-start
	$(PYTHON) benchmarks/kernels.py
	$(PYTHON) benchmarks/train_step.py --section mfu
	$(PYTHON) benchmarks/fsdp_throughput.py
	$(PYTHON) benchmarks/grpo_step.py --model $(REAL_MODEL) --device cuda --prompts 16 --max-new-tokens 64
	@$(PYTHON) benchmarks/results.py --since $$(cat .bench-start); rm -f .bench-start

# The real-model GRPO recipe (configs/examples/smollm2_grpo_arith.toml, docs/grpo.md "Recipe"): the generated
# two-digit arithmetic task (2000 train, 200 held-out problems), GRPO on CPU, then held-out accuracy before
# and after (greedy, and pass@1 over 2 samples at temperature 1). SEED=1 for the second seed.
ARITH ?= runs/smollm2_grpo_arith
ARITH_DATA ?= data/arithmetic
SEED ?= 0
ARITH_EVAL = $(PYTHON) -m minirlhf eval --prompts $(ARITH_DATA)/eval.jsonl --reward-functions \
	minirlhf.rewards:number_match --samples 2 --temperature 1 --max-new-tokens 16 --batch-size 32

grpo-arith-data: $(STAMP)
	$(PYTHON) -m minirlhf.tasks.arithmetic $(ARITH_DATA) --train 2000 --eval 200 --seed 0

grpo-arith: grpo-arith-data $(REAL_MODEL)/config.json
	$(ARITH_EVAL) --policy $(REAL_MODEL) --out $(ARITH)/eval_before.json
	$(PYTHON) train.py --config configs/examples/smollm2_grpo_arith.toml --set model.path=$(REAL_MODEL) \
		--set train.seed=$(SEED) --set train.output_dir=$(ARITH)/seed$(SEED) --overwrite
	$(ARITH_EVAL) --policy $(ARITH)/seed$(SEED) --out $(ARITH)/eval_after_seed$(SEED).json

# ruff pinned, with the rules of pyproject.toml: pycodestyle, pyflakes, import order, bugbear, complexity <= 12
lint:
	$(PYTHON) -m pip install -q "$(RUFF_PIN)"
	$(PYTHON) -m ruff check minirlhf tests benchmarks train.py

clean:
	rm -rf runs $(STAMP) .pytest_cache
