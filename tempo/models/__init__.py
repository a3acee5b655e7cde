"""Model backends behind one interface (tempo.models.base): Hugging Face, Megatron-core."""
