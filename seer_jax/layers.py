"""Parameterised building blocks: `Linear`, `Embedding`, `RMSNorm`.

Every weight is an `nnx.Param` carrying logical axis names as `out_sharding` metadata (vocab, embed, q_heads,
kv_heads, mlp, norm), created with `eager_sharding=False` so modules build without a mesh; a mesh is applied later
through `nnx.get_partition_spec`. Leaf names are HF's with `weight` renamed for its role: `kernel` (a Linear,
stored [in, out], the transpose of HF's [out, in]), `embedding`, `scale`; `bias` stays `bias`.

Each module computes in `dtype` (weights are cast from `param_dtype` at use).
"""

import jax
import jax.numpy as jnp
from flax import nnx


def _param(value: jax.Array, sharding: tuple[str, ...]) -> nnx.Param:
    return nnx.Param(value, out_sharding=sharding, eager_sharding=False)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel [in, out]."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool,
        sharding: tuple[str, str],
        initializer_range: float,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        init = nnx.initializers.normal(initializer_range)
        self.kernel = _param(init(rngs.params(), (in_features, out_features), param_dtype), sharding)
        self.bias = _param(jnp.zeros((out_features,), param_dtype), sharding[1:]) if use_bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("...i,io->...o", x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embedding(nnx.Module):
    """Token embedding table [V, D]; `attend` is the tied output projection [.., D] → [.., V]."""

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        initializer_range: float,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        init = nnx.initializers.normal(initializer_range)
        self.embedding = _param(init(rngs.params(), (num_embeddings, features), param_dtype), ("vocab", "embed"))
        self.dtype = dtype

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)  # [B, T, D]

    def attend(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("...d,vd->...v", x.astype(self.dtype), self.embedding[...].astype(self.dtype))


class RMSNorm(nnx.Module):
    """x / sqrt(mean(x^2) + eps) * scale over the last axis, normalising in float32 like HF.

    As in HF, the normalised activations are rounded to the compute dtype before the multiplication by the weight.
    """

    def __init__(self, features: int, *, eps: float, dtype: jnp.dtype, param_dtype: jnp.dtype):
        self.scale = _param(jnp.ones((features,), param_dtype), ("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(self.dtype) * self.scale[...].astype(self.dtype)
