"""Session fixtures: tiny HF checkpoints saved to disk once, and a left-padded batch."""

import jax
import pytest

from tests.seer_jax.hf_reference import FAMILIES, ROPE_VARIANTS, build_hf_model, left_padded_batch


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """name → (HF torch model, directory it was saved to), built once per session."""
    cache = {}

    def get(name: str):
        if name not in cache:
            config_class, overrides = {**FAMILIES, **ROPE_VARIANTS}[name]
            model = build_hf_model(config_class, overrides)
            directory = tmp_path_factory.mktemp(name)
            model.save_pretrained(directory)
            cache[name] = (model, directory)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def padded_batch():
    return left_padded_batch()


@pytest.fixture(autouse=True)
def full_float32_matmuls():
    """GPUs run float32 matmuls as TF32 by default; parity with float32 torch needs true float32 (no-op on CPU)."""
    with jax.default_matmul_precision("highest"):
        yield
