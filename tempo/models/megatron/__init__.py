"""Megatron-core backend (model.backend=megatron): TP, PP, DP and SP under torchrun.

parallel.py   layout checks (before any process-group work) and parallel-state set-up
cpu_compat.py the CUDA-only calls of megatron-core redirected to the CPU (CPU runs only)
convert.py    Hugging Face Qwen3 / OLMo3 <-> megatron weights and their tensor-parallel shards; the
              safetensors reader and the HF config a saved checkpoint carries
layers.py     the transformer blocks: Qwen3 and OLMo3 on megatron's modules, SP-ready norms
stage.py      one rank's pipeline stage of a GPTModel: TransformerConfig, layer specs, rotary angles
vocab_parallel.py  log-probs and entropy over a TP-sharded vocabulary (tempo_kernels' shard statistics)
model.py      MegatronModel (policy / critic), `load_model`, `init_parallel_for` (used by tempo.build)
"""
