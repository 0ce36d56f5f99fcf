"""Checkpoint converters between Hugging Face safetensors and seer-jax (Flax NNX / Orbax)."""
