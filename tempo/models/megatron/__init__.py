"""Megatron-core backend (model.backend=megatron): TP, PP, DP and SP under torchrun.

parallel.py   layout checks (before any process-group work) and parallel-state set-up
cpu_compat.py the CUDA-only calls of megatron-core redirected to the CPU (CPU runs only)
convert.py    Hugging Face Qwen3 / OLMo3 <-> megatron weights and their tensor-parallel shards
layers.py     the transformer blocks: Qwen3 and OLMo3 on megatron's modules, SP-ready norms
model.py      MegatronModel (policy / critic), `load_model`, `init_parallel_for` (used by tempo.build)
"""
