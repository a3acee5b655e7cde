"""Rollout engines behind one interface (tempo.rollout.base): HF generate, vLLM."""
