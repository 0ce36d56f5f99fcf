"""Tiny models with random weights for the SeerAttention tests, built without eager random init.

Eager `jax.random` init compiles once per parameter shape (seconds each on CPU), so modules are built abstractly
and filled from NumPy: weights ~ N(0, weight_std²), norm scales ~ 1 + N(0, 0.1²), biases ~ N(0, 0.1²).
"""

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from seer_jax.config import ModelConfig
from seer_jax.model import CausalLM
from seer_jax.rope import RopeConfig

# GQA (N = 4, K = 2), head_dim 16, Llama 3.1 RoPE scaling.
TINY = ModelConfig(
    model_type="llama",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_q_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rms_norm_eps=1e-6,
    rope=RopeConfig(rope_type="llama3", theta=500000.0, factor=8.0, original_max_position_embeddings=64),
    max_position_embeddings=4096,
    eos_token_ids=(1,),
    pad_token_id=0,
)


def random_module(build: Callable[[], nnx.Module], seed: int, *, weight_std: float = 0.02) -> nnx.Module:
    """`build()`'s module with every parameter drawn from a NumPy generator seeded by `seed`."""
    graphdef, state = nnx.split(nnx.eval_shape(build))
    rng = np.random.default_rng(seed)
    for path, variable in nnx.to_flat_state(state):
        abstract = variable.get_value()
        noise = rng.standard_normal(abstract.shape)
        if path[-1] == "scale":
            value = 1.0 + 0.1 * noise
        elif path[-1] == "bias":
            value = 0.1 * noise
        else:
            value = weight_std * noise
        variable.set_value(jnp.asarray(value, abstract.dtype))
    return nnx.merge(graphdef, state)


def random_tokens(seed: int, batch: int, length: int, vocab_size: int = TINY.vocab_size) -> np.ndarray:
    """int32 [B, T] token ids in [2, vocab) (0 is padding, 1 is EOS)."""
    return np.random.default_rng(seed).integers(2, vocab_size, (batch, length), dtype=np.int32)


# TINY with head_dim 128: the shapes the Mosaic kernels take (GPU tests).
HOPPER_TINY = dataclasses.replace(TINY, hidden_size=128, head_dim=128)


def hopper_base_model() -> CausalLM:
    """HOPPER_TINY in bf16 with cuDNN dense attention, random weights (std 0.1)."""
    return random_module(
        lambda: CausalLM(
            HOPPER_TINY,
            attention_implementation="cudnn",
            dtype=jnp.bfloat16,
            param_dtype=jnp.bfloat16,
            rngs=nnx.Rngs(0),
        ),
        0,
        weight_std=0.1,
    )
