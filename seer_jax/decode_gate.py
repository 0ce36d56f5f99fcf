"""SeerAttention-R's decode AttnGate: one score per (row, kv head, key block) for the token being decoded.

From the pre-RoPE q and k of a layer (after Qwen2's bias and Qwen3's q/k norm, as the prefill gate), docs/design.md §8:

    query:  q_gate [B, T, K, E] = per kv head, its G query heads pooled (`q_head_pooling`):
              Qproj     Σ_g q[k·G + g] @ Wq[k, g]           attngate_linear_q.weight [K, G, H, E]
              Qavgproj  mean_g q[k·G + g] @ Wq[k]           attngate_linear_q.weight [K, H, E]
              Qavg      mean_g q[k·G + g]                   no weight (E == H)
            → RMSNorm over E (attngate_qnorm, optional) → RoPE at the token's position (rotary size E)
    key:    k_gate [B, J, K, E] = concat over the k ops (max | min | avg) of k pooled over each block of
            `block_size` positions, @ Wk[k] (attngate_linear_k.weight [K, Ck, E], Ck = H · number of ops)
            → RMSNorm over E (attngate_knorm, optional) → RoPE at the block's FIRST position j · block_size
    score:  logits[b, k, j] = <q_gate[b, k], k_gate[b, j, k]> · E^-½      (shared by the G heads of kv head k)

Weights are stored in × out as the official `HeadPoolingLinear`/`MultiHeadLinear`, computed in float32, and are
`GateParam`s. A model can hold a prefill gate and a decode gate in the same layer: the decode gate sits at
`self_attn.decode_gate` (the prefill gate keeps `self_attn.attn_gate`). Its leaf names are the official ones
(`attngate_linear_q`, `attngate_linear_k`, `attngate_qnorm`, `attngate_knorm`), which never occur in a prefill
gate, so an official SeerAttention-R tensor name maps to ours by one segment (`official_name`,
`from_official_name`) and a model with both gates loads both official adapters without a collision.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from seer_jax.config import ModelConfig
from seer_jax.decode_config import DecodeConfig
from seer_jax.gate import GateParam, MultiHeadLinear, pool_blocks
from seer_jax.rope import apply_rope

DECODE_GATE = "decode_gate"  # the attribute of a layer's attention that holds its decode gate
OFFICIAL_GATE = "attn_gate"  # where the official SeerAttention-R code keeps it
# The decode gates' weights alone (to train or save them apart from the prefill gates).
DECODE_GATE_PARAMS = nnx.All(GateParam, nnx.PathContains(DECODE_GATE))
GATE_NORM_EPS = 1e-6  # the official attngate_qnorm / attngate_knorm epsilon


def official_name(name: str) -> str:
    """Our decode-gate tensor name (`model.layers.3.self_attn.decode_gate.attngate_linear_k.weight`) → the official
    one (`….self_attn.attn_gate.attngate_linear_k.weight`); other names are returned unchanged."""
    return name.replace(f".{DECODE_GATE}.", f".{OFFICIAL_GATE}.", 1)


def from_official_name(name: str) -> str:
    """The inverse of `official_name`: official `….attn_gate.attngate_*` names → ours; others unchanged."""
    marker = f".{OFFICIAL_GATE}.attngate_"
    return name.replace(marker, f".{DECODE_GATE}.attngate_", 1) if marker in name else name


class GateRMSNorm(nnx.Module):
    """RMSNorm over the gate's hidden size E: x · rsqrt(mean(x²) + 1e-6) · weight, float32; weight [E]."""

    def __init__(self, features: int, *, param_dtype: jnp.dtype):
        self.weight = GateParam(jnp.ones((features,), param_dtype), out_sharding=("gate_hidden",), eager_sharding=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        normed = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + GATE_NORM_EPS)
        return normed * self.weight[...].astype(jnp.float32)


class HeadPoolingLinear(nnx.Module):
    """`Qproj`: per kv head, a linear map of its G query heads concatenated, weight [K, G, H, E], no bias."""

    def __init__(
        self,
        num_kv_heads: int,
        group: int,
        head_dim: int,
        out_features: int,
        *,
        initializer_range: float,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        init = nnx.initializers.normal(initializer_range)
        value = init(rngs.params(), (num_kv_heads, group, head_dim, out_features), param_dtype)
        self.weight = GateParam(value, out_sharding=("kv_heads", None, "gate_in", "gate_hidden"), eager_sharding=False)

    def __call__(self, q: jax.Array) -> jax.Array:
        """q [B, T, N, H] → float32 [B, T, K, E]."""
        weight = self.weight[...].astype(jnp.float32)  # [K, G, H, E]
        num_kv_heads, group, head_dim, _ = weight.shape
        grouped = q.astype(jnp.float32).reshape(*q.shape[:2], num_kv_heads, group, head_dim)  # [B, T, K, G, H]
        return jnp.einsum("btkgh,kghe->btke", grouped, weight)  # [B, T, K, E]


class DecodeAttnGate(nnx.Module):
    """A layer's decode gate (module docstring). Computation is float32 whatever the weights' dtype.

    Args:
      config: the base model (heads, head_dim, RoPE, initializer_range).
      decode_config: the gate's structure.
      param_dtype: dtype of the weights.
      rngs: random init: linear weights Normal(0, initializer_range), norm weights 1 (the official init, §4.5).
    """

    def __init__(self, config: ModelConfig, decode_config: DecodeConfig, *, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        num_q_heads, num_kv_heads, head_dim = config.num_q_heads, config.num_kv_heads, config.head_dim
        hidden = decode_config.hidden_size
        linear = dict(initializer_range=config.initializer_range, param_dtype=param_dtype, rngs=rngs)
        pooling = decode_config.q_head_pooling
        if pooling == "Qproj":
            group = num_q_heads // num_kv_heads
            self.attngate_linear_q = HeadPoolingLinear(num_kv_heads, group, head_dim, hidden, **linear)
        elif pooling == "Qavgproj":
            self.attngate_linear_q = MultiHeadLinear(num_kv_heads, head_dim, hidden, head_axis="kv_heads", **linear)
        else:
            if hidden != head_dim:
                raise ValueError(f"q_head_pooling 'Qavg' needs hidden_size == head_dim ({head_dim}), got {hidden}")
            self.attngate_linear_q = None
        k_in = head_dim * len(decode_config.k_ops)
        self.attngate_linear_k = MultiHeadLinear(num_kv_heads, k_in, hidden, head_axis="kv_heads", **linear)
        self.attngate_qnorm = GateRMSNorm(hidden, param_dtype=param_dtype) if decode_config.qk_norm else None
        self.attngate_knorm = GateRMSNorm(hidden, param_dtype=param_dtype) if decode_config.qk_norm else None
        self.decode_config = decode_config
        self.rope = config.rope
        self.num_q_heads, self.num_kv_heads = num_q_heads, num_kv_heads

    def query(self, q: jax.Array, positions: jax.Array) -> jax.Array:
        """Pre-RoPE q [B, T, N, H] at RoPE positions int [B, T] → the gate queries float32 [B, T, K, E]."""
        if self.decode_config.q_head_pooling == "Qproj":
            q_gate = self.attngate_linear_q(q)  # [B, T, K, E]
        else:
            batch, length, _, head_dim = q.shape
            grouped = q.astype(jnp.float32).reshape(batch, length, self.num_kv_heads, -1, head_dim)  # [B, T, K, G, H]
            q_gate = jnp.mean(grouped, axis=3)  # [B, T, K, H]
            if self.attngate_linear_q is not None:
                q_gate = self.attngate_linear_q(q_gate)  # [B, T, K, E]
        return self._norm_and_rotate(q_gate, self.attngate_qnorm, positions)

    def pool(self, k: jax.Array, *, lengths: jax.Array | None = None) -> jax.Array:
        """Pre-RoPE k [B, S, K, H] → float32 [B, J, K, Ck]: the k ops over each block (`gate.pool_blocks`; positions
        >= lengths[b] are ignored, a block without a valid position pools to zeros)."""
        ops, block_size = self.decode_config.k_ops, self.decode_config.block_size
        return pool_blocks(jax.lax.stop_gradient(k), ops, block_size=block_size, lengths=lengths)

    def keys(self, pooled: jax.Array, positions: jax.Array) -> jax.Array:
        """Pooled blocks float32 [B, J, K, Ck] at RoPE positions int [B, J] → the gate keys float32 [B, J, K, E]."""
        return self._norm_and_rotate(self.attngate_linear_k(pooled), self.attngate_knorm, positions)

    def scores(self, q_gate: jax.Array, k_gate: jax.Array) -> jax.Array:
        """Gate queries float32 [B, K, E] against gate keys [B, J, K, E] → logits float32 [B, K, J] (· E^-½)."""
        hidden = self.decode_config.hidden_size
        return jnp.einsum("bke,bjke->bkj", q_gate, k_gate.astype(jnp.float32)) * hidden**-0.5  # [B, K, J]

    def _norm_and_rotate(self, x: jax.Array, norm: GateRMSNorm | None, positions: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32) if norm is None else norm(x)  # [B, T, K, E]
        return apply_rope(x, positions, self.rope) if self.decode_config.use_rope else x
