"""SeerAttention's prefill AttnGate: scores every (query block, key block) pair of a layer from its pre-RoPE q and k.

For blocks of `block_size` (64) positions, I = J = ceil(T / 64), per query head (docs/design.md §4):

    pool:   q_pooled [B, I, N, Cq] = concat over the q ops (max | min | avg) of q pooled along each block
            k_pooled [B, J, K, Ck] = concat over the k ops of k pooled along each block
    score:  q_gate = q_pooled                        (single-linear mode)   or  q_pooled @ Wq[n]   [B, I, N, E]
            k_gate = repeat_kv(k_pooled) @ Wk[n]     (single-linear mode)   or  k_pooled @ Wk[k]   [B, J, N|K, E]
            q_gate, k_gate = RoPE(q_gate, pos = i·64), RoPE(k_gate, pos = j·64)       (rotary dim E)
            logits[b, n, i, j] = <q_gate[b, i, n], k_gate[b, j, n // G]> · E^-0.5   for j <= i, else MASKED_LOGIT

Cq = H · (number of q ops), Ck = H · (number of k ops). The gate type string `Q<ops>_K<ops>` names the ops, always
in the order max, min, avg (e.g. `Qavg_Kmaxminavg`, the default and the released gates' type).

Single-linear mode (the released gates) is used when there is one q op, E == H and not `force_double`: no q weight,
and one k weight per query head, `mask_linear_k.weight` [N, Ck, E], applied to its kv head's pooled k (q head n reads
kv head n // G). Otherwise (double-linear mode) `mask_linear_q.weight` [N, Cq, E] and `mask_linear_k.weight`
[K, Ck, E], and the rotated k_gate is shared by the G query heads of its kv head. Weights are laid out as the
official `MultiHeadLinear` ([heads, in, out], no bias), so official tensors load as they are; they are `GateParam`s,
so `nnx.state(model, GateParam)` selects exactly the gates.

RoPE is the base model's (theta and scaling: llama3, yarn with its cos/sin attention scaling, …) computed for rotary
dim E (docs/design.md §6.5: the official code rotates over H, the same only because its E = H = 128). Every block sits
at its first token, so the offset between two blocks is a multiple of 64.

Pooling is ragged-safe: a partial last block (or a whole prompt shorter than one block) pools only its valid tokens,
and avg divides by their number, as PyTorch's `ceil_mode=True` pooling does; with `lengths`, positions at or after a
row's length are ignored too, and a block without a valid position pools to zeros.

Gradients never reach q and k (they enter the gate through `jax.lax.stop_gradient`), and the gate runs in float32
whatever the model's dtype: pooled features are 64× smaller than the sequence, so this costs little.

`AttnGate.pool` (parameter-free) and `AttnGate.score` (parametric) are separate, so gate distillation can collect the
small `GateFeatures` of every layer during one no-grad forward and then differentiate `score` alone.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
from flax import nnx

from seer_jax.config import ModelConfig
from seer_jax.rope import RopeConfig, apply_rope
from seer_jax.sparsity import causal_block_mask

POOLING_OPS = ("max", "min", "avg")  # the fixed order in which pooled features are concatenated
# Logit of a key block above the diagonal. Finite, unlike -inf: log_softmax stays finite there, so a KL term
# target · (log target − log_softmax) whose target is 0 is 0, never 0 · inf = NaN; exp(MASKED_LOGIT − max) is
# exactly 0 in float32, so softmax equals the softmax over the causal blocks alone.
MASKED_LOGIT = -1e9
_GATE_TYPE = re.compile(r"Q(?P<q>(?:max|min|avg)+)_K(?P<k>(?:max|min|avg)+)")


class GateParam(nnx.Param):
    """The Variable type of AttnGate weights: `nnx.state(model, GateParam)` holds the gates and nothing else.

    A subclass of `nnx.Param`, so `nnx.Param` filters include the gates; the frozen base model's weights are
    `nnx.All(nnx.Param, nnx.Not(GateParam))`.
    """


def _split_ops(ops: str) -> tuple[str, ...]:
    return tuple(ops[start : start + 3] for start in range(0, len(ops), 3))


@dataclasses.dataclass(frozen=True, kw_only=True)
class GateConfig:
    """Structure of a prefill AttnGate (official config keys in parentheses).

    Attributes:
      gate_type: `Q<ops>_K<ops>`, ops from max, min, avg in that order (`seerattn_gate_type`).
      hidden_size: E, the gate's projection and rotary size (`seerattn_gate_hidden_size`).
      block_size: positions per pooled block (`seerattn_gate_block_size`).
      force_double: use separate q and k weights even when single-linear mode applies
        (`seerattn_gate_force_double`).
    """

    gate_type: str = "Qavg_Kmaxminavg"
    hidden_size: int = 128
    block_size: int = 64
    force_double: bool = False

    def __post_init__(self):
        match = _GATE_TYPE.fullmatch(self.gate_type) if isinstance(self.gate_type, str) else None
        if match is None:
            raise ValueError(
                f"gate_type must look like 'Q<ops>_K<ops>' with ops from max, min, avg (e.g. 'Qavg_Kmaxminavg'), "
                f"got {self.gate_type!r}"
            )
        for side in ("q", "k"):
            ops = _split_ops(match[side])
            canonical = tuple(op for op in POOLING_OPS if op in ops)
            if ops != canonical:
                raise ValueError(
                    f"gate_type {self.gate_type!r}: {side.upper()} ops must appear once each, in the order max, min, "
                    f"avg (write {side.upper()}{''.join(canonical)})"
                )
        if not isinstance(self.hidden_size, int) or self.hidden_size <= 0 or self.hidden_size % 2:
            raise ValueError(f"hidden_size must be a positive even int (RoPE rotates pairs), got {self.hidden_size!r}")
        if not isinstance(self.block_size, int) or self.block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")

    @property
    def q_ops(self) -> tuple[str, ...]:
        """Pooling ops applied to q, in concatenation order."""
        return _split_ops(_GATE_TYPE.fullmatch(self.gate_type)["q"])

    @property
    def k_ops(self) -> tuple[str, ...]:
        """Pooling ops applied to k, in concatenation order."""
        return _split_ops(_GATE_TYPE.fullmatch(self.gate_type)["k"])

    def single_linear(self, head_dim: int) -> bool:
        """Whether a model with this head_dim (H) gets the single-linear gate (k weight only, N heads)."""
        return len(self.q_ops) == 1 and self.hidden_size == head_dim and not self.force_double


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GateFeatures:
    """The parameter-free part of a gate's input: block-pooled pre-RoPE q and k, float32.

    Attributes:
      q: [B, I, N, Cq], the q ops' pooled features concatenated along the last axis.
      k: [B, J, K, Ck], the k ops' pooled features concatenated along the last axis.
    """

    q: jax.Array
    k: jax.Array


def pool_blocks(x: jax.Array, ops: tuple[str, ...], *, block_size: int, lengths: jax.Array | None = None) -> jax.Array:
    """Pools x [B, T, heads, dim] over blocks of `block_size` positions → float32 [B, I, heads, len(ops) · dim].

    The ops' results are concatenated along the last axis in the order given. Positions t >= T, and t >= lengths[b]
    when `lengths` (int [B]) is given, are ignored; a block without a valid position pools to zeros.
    """
    batch, length, heads, dim = x.shape
    num_blocks = -(-length // block_size)
    padded = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, num_blocks * block_size - length), (0, 0), (0, 0)))
    blocks = padded.reshape(batch, num_blocks, block_size, heads, dim)  # [B, I, block, heads, dim]
    valid_lengths = jnp.full((batch,), length) if lengths is None else jnp.minimum(lengths, length)  # [B]
    positions = jnp.arange(num_blocks * block_size).reshape(num_blocks, block_size)  # [I, block]
    valid = (positions[None] < valid_lengths[:, None, None])[..., None, None]  # [B, I, block, 1, 1]
    count = jnp.sum(valid, axis=2)  # [B, I, 1, 1]
    pooled = []
    for op in ops:
        if op == "max":
            pooled.append(jnp.max(jnp.where(valid, blocks, -jnp.inf), axis=2))  # [B, I, heads, dim]
        elif op == "min":
            pooled.append(jnp.min(jnp.where(valid, blocks, jnp.inf), axis=2))  # [B, I, heads, dim]
        elif op == "avg":
            total = jnp.sum(jnp.where(valid, blocks, 0.0), axis=2)  # [B, I, heads, dim]
            pooled.append(total / jnp.maximum(count, 1))
        else:
            raise ValueError(f"pooling op {op!r} is not one of {POOLING_OPS}")
    features = jnp.concatenate(pooled, axis=-1)  # [B, I, heads, len(ops) · dim]
    return jnp.where(count > 0, features, 0.0)


def block_positions(batch: int, num_blocks: int, block_size: int) -> jax.Array:
    """int32 [B, I]: the RoPE position of each block, that of its first token (i · block_size)."""
    return jnp.broadcast_to(jnp.arange(num_blocks, dtype=jnp.int32) * block_size, (batch, num_blocks))


class MultiHeadLinear(nnx.Module):
    """Per-head linear map without bias, weight [heads, in, out] (the official `MultiHeadLinear` layout)."""

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        out_features: int,
        *,
        head_axis: str,
        initializer_range: float,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        init = nnx.initializers.normal(initializer_range)
        value = init(rngs.params(), (num_heads, in_features, out_features), param_dtype)
        self.weight = GateParam(value, out_sharding=(head_axis, "gate_in", "gate_hidden"), eager_sharding=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, I, h, in] → float32 [B, I, heads, out], where weight head n reads input head n // (heads / h)."""
        weight = self.weight[...].astype(jnp.float32)  # [heads, in, out]
        num_heads, in_features, out_features = weight.shape
        batch, num_blocks, num_input_heads, _ = x.shape
        group = num_heads // num_input_heads
        grouped = weight.reshape(num_input_heads, group, in_features, out_features)  # [h, heads / h, in, out]
        out = jnp.einsum("bihc,hgce->bihge", x.astype(jnp.float32), grouped)  # [B, I, h, heads / h, out]
        return out.reshape(batch, num_blocks, num_heads, out_features)  # [B, I, heads, out]


class AttnGate(nnx.Module):
    """A layer's prefill gate: pre-RoPE q [B, T, N, H] and k [B, T, K, H] → block logits float32 [B, N, I, J].

    Args:
      config: the base model (heads, head_dim, RoPE, initializer_range).
      gate_config: the gate's structure.
      param_dtype: dtype of the weights (computation is float32).
      rngs: random init, Normal(0, config.initializer_range) as the official gates (docs/design.md §4).
    """

    def __init__(self, config: ModelConfig, gate_config: GateConfig, *, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        num_q_heads, num_kv_heads, head_dim = config.num_q_heads, config.num_kv_heads, config.head_dim
        hidden = gate_config.hidden_size
        linear = dict(initializer_range=config.initializer_range, param_dtype=param_dtype, rngs=rngs)
        k_in = head_dim * len(gate_config.k_ops)
        if gate_config.single_linear(head_dim):
            self.mask_linear_q = None
            self.mask_linear_k = MultiHeadLinear(num_q_heads, k_in, hidden, head_axis="q_heads", **linear)
        else:
            q_in = head_dim * len(gate_config.q_ops)
            self.mask_linear_q = MultiHeadLinear(num_q_heads, q_in, hidden, head_axis="q_heads", **linear)
            self.mask_linear_k = MultiHeadLinear(num_kv_heads, k_in, hidden, head_axis="kv_heads", **linear)
        self.gate_config = gate_config
        self.rope: RopeConfig = config.rope
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim

    def pool(self, q: jax.Array, k: jax.Array, *, lengths: jax.Array | None = None) -> GateFeatures:
        """Pre-RoPE q [B, T, N, H] and k [B, T, K, H] → their block-pooled `GateFeatures` (no gradient into q, k).

        lengths: int [B], the number of valid positions of each row (all T when None); see `pool_blocks`.
        """
        expected_q = (*q.shape[:2], self.num_q_heads, self.head_dim)
        expected_k = (*q.shape[:2], self.num_kv_heads, self.head_dim)
        if q.shape != expected_q or k.shape != expected_k:
            raise ValueError(
                f"AttnGate takes q [B, T, N, H] = {expected_q} and k [B, T, K, H] = {expected_k}, "
                f"got {q.shape} and {k.shape}"
            )
        q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
        block_size = self.gate_config.block_size
        return GateFeatures(
            q=pool_blocks(q, self.gate_config.q_ops, block_size=block_size, lengths=lengths),  # [B, I, N, Cq]
            k=pool_blocks(k, self.gate_config.k_ops, block_size=block_size, lengths=lengths),  # [B, J, K, Ck]
        )

    def score(self, features: GateFeatures) -> jax.Array:
        """`GateFeatures` → float32 logits [B, N, I, J]; MASKED_LOGIT above the diagonal (the diagonal is allowed)."""
        batch, num_q_blocks = features.q.shape[:2]
        num_kv_blocks = features.k.shape[1]
        hidden, block_size = self.gate_config.hidden_size, self.gate_config.block_size
        q = features.q if self.mask_linear_q is None else self.mask_linear_q(features.q)  # [B, I, N, E]
        k = self.mask_linear_k(features.k)  # [B, J, N, E] single-linear, [B, J, K, E] double-linear
        q = apply_rope(q, block_positions(batch, num_q_blocks, block_size), self.rope)
        k = apply_rope(k, block_positions(batch, num_kv_blocks, block_size), self.rope)
        key_heads = k.shape[2]
        # single-linear: [B, I, N, 1, E] against k [B, J, N, E]; double-linear: [B, I, K, G, E] against [B, J, K, E]
        grouped = q.reshape(batch, num_q_blocks, key_heads, self.num_q_heads // key_heads, hidden)
        logits = jnp.einsum("bikge,bjke->bkgij", grouped, k) * hidden**-0.5  # [B, N, 1, I, J] or [B, K, G, I, J]
        logits = logits.reshape(batch, self.num_q_heads, num_q_blocks, num_kv_blocks)  # [B, N, I, J]
        return jnp.where(causal_block_mask(num_q_blocks, num_kv_blocks), logits, MASKED_LOGIT)

    def __call__(self, q: jax.Array, k: jax.Array, *, lengths: jax.Array | None = None) -> jax.Array:
        """`score(pool(q, k, lengths=lengths))`: pre-RoPE q [B, T, N, H], k [B, T, K, H] → logits [B, N, I, J]."""
        return self.score(self.pool(q, k, lengths=lengths))
