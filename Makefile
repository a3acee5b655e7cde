# Two commands: `make run` (the main job on the embedded default) and `make test`.
# Each creates .venv and installs what it needs on first use.
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= configs/tiny_cpu.yaml

.PHONY: install run test test-all bench compare scaling clean

$(STAMP): requirements-cpu.txt setup.py $(wildcard csrc/*)
	python3 -m venv $(VENV)
	$(BIN)/pip install -q -r requirements-cpu.txt
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/tempo train --config $(CONFIG) $(ARGS)

test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/pytest -q -m "not slow"

test-all: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/pytest -q

# Benchmarks write their tables to benchmarks/results/ (liger-kernel is the loss baseline, TRL the
# trainer baseline: both benchmark-only).
bench: $(STAMP)
	$(BIN)/pip install -q --no-deps liger-kernel==0.8.5
	$(BIN)/pytest -q -s benchmarks/bench_kernels.py
	$(BIN)/python benchmarks/bench_vote.py
	$(BIN)/pip install -q trl==1.16.0
	$(BIN)/python benchmarks/bench_vs_trl.py

compare: $(STAMP)
	$(BIN)/tempo compare --config $(CONFIG) --methods tempo,tempo-fixed-critic,rlvr,ttrl,empo --seeds 0,1,2 \
		--out benchmarks/results/compare_tiny_cpu run.save_checkpoints=false run.tensorboard=false run.progress=false

# The title claim in miniature: 4x the default steps, evaluated at 1x, 2x and 4x; then TEMPO
# against its frozen critic on a drifting task, where stage 1 never saw a multiplication.
scaling: $(STAMP)
	$(BIN)/tempo compare --config $(CONFIG) --methods tempo,tempo-fixed-critic,ttrl,empo,rlvr,m-step-only \
		--seeds 0,1,2 --at 40,80,160 --out benchmarks/results/scaling_tiny_cpu --name scaling train.steps=160 eval.every=40 \
		run.save_checkpoints=false run.tensorboard=false run.progress=false
	$(BIN)/tempo compare --config $(CONFIG) --methods tempo,tempo-fixed-critic --seeds 0,1,2 --at 40,80,160 \
		--out benchmarks/results/scaling_tiny_cpu/drift_ops --name drift train.steps=160 eval.every=40 task.stage1_ops=+- \
		run.save_checkpoints=false run.tensorboard=false run.progress=false

clean:
	rm -rf $(VENV) build *.egg-info tempo/*.so .cache runs
