"""SeerAttention models: a `CausalLM` whose attention layers carry an AttnGate and prefill block-sparsely.

    SeerCausalLM(CausalLM)
      model.layers[i].self_attn: SeerAttention(Attention)     q/k/v/o projections as in `Attention`
        attn_gate: AttnGate                                     mask_linear_k (+ mask_linear_q) weights, GateParam

so the gates sit at the official paths (`model.layers.{i}.self_attn.attn_gate.mask_linear_k.weight`).

Prefill (no cache), in layers i >= `start_layer`:
    block scores [B, N, I, J] from the configured source → `select_blocks` → `block_sparse_attention` on the rotated
    q/k and v. Sources: "gate" (the learned AttnGate on the pre-RoPE q/k), "oracle" (the layer's true pooled
    attention), "quest", "streaming", "random" (training-free baselines, `seer_jax.baselines`).
Layers below `start_layer` attend densely (the model's own attention implementation); their gates exist (an adapter
holds every layer's weights) but do not select anything. Decode steps (with a cache) are dense in every layer.
With a dense selection (nz_ratio 1, threshold 0) every causal block is computed and the logits equal the dense
model's.

Left padding. The block-sparse kernel has no key mask, so each row is moved to start at its first real token
(padding rotated to the end of the row), attended there, and moved back; blocks, gate pooling and RoPE block
positions then count real tokens only. A left-padded row therefore gets exactly the blocks and the outputs it would
get unpadded, and never attends to padding (the official code instead masks whole padding blocks in the gate and
pools blocks that straddle the padding, SEER_SPEC §1.5, §10.14). `last_block_dense` keeps each row's own last two
real block rows dense. As in the official code, TopK keeps k = f(nz_ratio, J) blocks per row with J counted over
the padded length, so the shorter rows of a padded batch come out denser. Padding positions get finite garbage, as
in the dense model. `attention_mask` must be left padding (False only before a row's first real token).

Reporting and distillation (plain functions over a `SeerCausalLM`; call them eagerly or inside a jit):
    block_density(model, tokens, attention_mask=None) → f32 [L, N]: the causal block density each layer and head
        computed (over real query blocks of every row; 1.0 for dense layers).
    logits_and_density(model, tokens, attention_mask=None) → (logits, density): the model's logits and
        `block_density` from one prefill (perplexity at a measured density).
    distillation_inputs(model, tokens, attention_mask=None) → (features, targets): per layer the gate's
        `GateFeatures` and the true pooled attention map f32 [B, N, I, J] (its distillation target, SEER_SPEC §2.1),
        from one dense forward whose attention is `attention_with_pooling` (the base model's outputs, unchanged).
    gate_logits(model, features) → per layer the logits [B, N, I, J] of `attn_gate.score`.
A distillation step runs `distillation_inputs` without gradients, then differentiates a loss of
`gate_logits(model, features)` and the targets with respect to `nnx.state(model, GateParam)` only.
"""

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.block_sparse_attention import BLOCK_SIZE
from seer_jax import baselines
from seer_jax.config import ModelConfig
from seer_jax.gate import AttnGate, GateConfig, GateFeatures, GateParam
from seer_jax.head_parallel import attention_with_pooling_per_device, block_sparse_attention_per_device
from seer_jax.model import Attention, CausalLM, positions_from_mask
from seer_jax.rope import apply_rope
from seer_jax.sparsity import NUM_DENSE_LAST_ROWS, Selection, causal_block_mask, select_blocks

BlockSource = Literal["gate", "oracle", "quest", "streaming", "random"]
BLOCK_SOURCES: tuple[BlockSource, ...] = ("gate", "oracle", "quest", "streaming", "random")
_RANKING_SOURCES = ("streaming", "random")  # scores that are rankings, not logits: TopK only


@dataclasses.dataclass(frozen=True, kw_only=True)
class SeerConfig:
    """How a SeerAttention model chooses and computes its prefill blocks.

    Attributes:
      gate: the AttnGate structure; its `block_size` must be the kernel's 64.
      selection: scores → block mask: method ("nz_ratio" | "threshold"), nz_ratio, threshold, last_block_dense.
      source: where block scores come from, one of `BLOCK_SOURCES`.
      start_layer: layers with a smaller index attend densely.
      seed: seeds the "random" source (each layer folds in its index).
    """

    gate: GateConfig = dataclasses.field(default_factory=GateConfig)
    selection: Selection = dataclasses.field(default_factory=Selection)
    source: BlockSource = "gate"
    start_layer: int = 0
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.gate, GateConfig):
            raise ValueError(f"gate must be a GateConfig, got {type(self.gate).__name__}")
        if not isinstance(self.selection, Selection):
            raise ValueError(f"selection must be a sparsity.Selection, got {type(self.selection).__name__}")
        if self.gate.block_size != BLOCK_SIZE:
            raise ValueError(
                f"gate.block_size must be {BLOCK_SIZE} (block_sparse_attention computes {BLOCK_SIZE}×{BLOCK_SIZE} "
                f"blocks), got {self.gate.block_size}"
            )
        if self.source not in BLOCK_SOURCES:
            raise ValueError(f"source must be one of {BLOCK_SOURCES}, got {self.source!r}")
        if self.source in _RANKING_SOURCES and self.selection.method != "nz_ratio":
            raise ValueError(
                f"source {self.source!r} ranks blocks without probabilities: use selection method 'nz_ratio', "
                f"not {self.selection.method!r}"
            )
        if not isinstance(self.start_layer, int) or self.start_layer < 0:
            raise ValueError(f"start_layer must be an int >= 0, got {self.start_layer!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (`from_dict` reads it back)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SeerConfig":
        """Reads `to_dict`'s output; unknown keys raise `ValueError`."""
        data = dict(data)
        gate = _from_fields(GateConfig, data.pop("gate", {}), "seer_config.gate")
        selection = _from_fields(Selection, data.pop("selection", {}), "seer_config.selection")
        return _from_fields(cls, {**data, "gate": gate, "selection": selection}, "seer_config")


def _from_fields(cls: type, data: Mapping[str, Any], where: str):
    unknown = sorted(set(data) - {field.name for field in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}")
    return cls(**data)


class _RowLayout:
    """Moves left-padded rows to start at their first real token (padding rotated to the end) and back."""

    def __init__(self, key_mask: jax.Array | None, length: int):
        self.length = length
        self.lengths = None if key_mask is None else jnp.sum(key_mask, axis=-1, dtype=jnp.int32)  # [B]

    def _rotate(self, x: jax.Array, direction: int) -> jax.Array:
        if self.lengths is None:
            return x
        shift = direction * (self.length - self.lengths)  # [B]: padding tokens of each row
        source = (jnp.arange(self.length)[None, :] + shift[:, None]) % self.length  # [B, T]
        return jnp.take_along_axis(x, source.reshape(*source.shape, *([1] * (x.ndim - 2))), axis=1)

    def align(self, x: jax.Array) -> jax.Array:
        """[B, T, ...] left-padded → [B, T, ...] with row b's real tokens at positions 0 .. lengths[b] - 1."""
        return self._rotate(x, 1)

    def restore(self, x: jax.Array) -> jax.Array:
        """The inverse of `align`."""
        return self._rotate(x, -1)


class SeerAttention(Attention):
    """`Attention` with an AttnGate (`attn_gate`) and block-sparse prefill; decode steps stay dense.

    Args:
      config, attention_implementation, dtype, param_dtype, rngs: as for `Attention`; the gate's weights use
        `param_dtype` and `rngs` too.
      seer_config: the sparsity settings.
      layer_index: this layer's index (compared with `start_layer`; folded into the "random" source's seed).
    """

    def __init__(
        self,
        config: ModelConfig,
        seer_config: SeerConfig,
        *,
        layer_index: int,
        attention_implementation: str,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        super().__init__(
            config, attention_implementation=attention_implementation, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.attn_gate = AttnGate(config, seer_config.gate, param_dtype=param_dtype, rngs=rngs)
        self.seer_config = seer_config
        self.layer_index = layer_index

    @property
    def is_sparse(self) -> bool:
        """Whether this layer's prefill is block-sparse (layer_index >= start_layer)."""
        return self.layer_index >= self.seer_config.start_layer

    def __call__(
        self,
        hidden: jax.Array,
        positions: jax.Array,
        *,
        key_mask: jax.Array | None,
        cache: tuple[jax.Array, jax.Array] | None = None,
        cache_index: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """As `Attention.__call__`: block-sparse without a cache, dense decode with one."""
        if cache is not None:
            return super().__call__(hidden, positions, key_mask=key_mask, cache=cache, cache_index=cache_index)
        out, kv, _ = self.prefill(hidden, positions, key_mask=key_mask)
        return out, kv

    def prefill(
        self, hidden: jax.Array, positions: jax.Array, *, key_mask: jax.Array | None
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array], jax.Array]:
        """A causal forward over T tokens (arguments as in `Attention.__call__` without a cache).

        Returns:
          The output [B, T, D]; the rotated keys and values [B, T, K, H]; and the computed block mask bool
          [B, N, I, J], in each row's own block coordinates (blocks counted from its first real token).
        """
        batch, length, _ = hidden.shape
        num_blocks = -(-length // BLOCK_SIZE)
        q, k, v = self.project_qkv(hidden)  # pre-RoPE: [B, T, N, H], [B, T, K, H], [B, T, K, H]
        q_rot, k_rot = apply_rope(q, positions, self.rope), apply_rope(k, positions, self.rope)
        every_block = jnp.broadcast_to(
            causal_block_mask(num_blocks, num_blocks), (batch, self.num_q_heads, num_blocks, num_blocks)
        )
        if not self.is_sparse:
            out = self.attend(q_rot, k_rot, v, causal=True, key_mask=key_mask)  # [B, T, N, H]
            return self._project_out(out), (k_rot, v), every_block
        selection = self.seer_config.selection
        rows = _RowLayout(key_mask, length)
        q_rot_rows, k_rot_rows, v_rows = rows.align(q_rot), rows.align(k_rot), rows.align(v)
        if selection.is_dense:
            block_mask = every_block
        else:
            scores = self._block_scores(rows.align(q), rows.align(k), q_rot_rows, k_rot_rows, v_rows, rows.lengths)
            block_mask = select_blocks(scores, selection)  # [B, N, I, J]
            if selection.last_block_dense and rows.lengths is not None:
                block_mask = block_mask | _last_rows_of_each_row(rows.lengths, num_blocks)
        out = block_sparse_attention_per_device(q_rot_rows, k_rot_rows, v_rows, block_mask)  # [B, T, N, H]
        return self._project_out(rows.restore(out)), (k_rot, v), block_mask

    def prefill_with_target(
        self, hidden: jax.Array, positions: jax.Array, *, key_mask: jax.Array | None
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array], GateFeatures, jax.Array]:
        """A dense causal forward that also returns the gate's features and its distillation target.

        The attention is `attention_with_pooling` on the rotated q/k (dense, so the layer's output is the base
        model's). Returns the output [B, T, D], the rotated keys and values [B, T, K, H], this layer's
        `GateFeatures` and the row-normalised max-pooled attention map f32 [B, N, I, J], both in each row's own
        block coordinates. With left padding the pooled map of a row's last, partial block also pools the padding
        queries after it.
        """
        q, k, v = self.project_qkv(hidden)  # pre-RoPE: [B, T, N, H], [B, T, K, H], [B, T, K, H]
        q_rot, k_rot = apply_rope(q, positions, self.rope), apply_rope(k, positions, self.rope)
        rows = _RowLayout(key_mask, hidden.shape[1])
        features = self.attn_gate.pool(rows.align(q), rows.align(k), lengths=rows.lengths)
        out, target = attention_with_pooling_per_device(
            rows.align(q_rot), rows.align(k_rot), rows.align(v), block_size=self.seer_config.gate.block_size
        )
        return self._project_out(rows.restore(out)), (k_rot, v), features, target

    def prefill_for_training(
        self, hidden: jax.Array, positions: jax.Array
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array], jax.Array, jax.Array]:
        """A causal forward for fine-tuning with SeerAttention (SEER_SPEC §8): unpadded rows only.

        The output [B, T, D] is block-sparse (dense below `start_layer`) and differentiable in q, k, v; the blocks
        come from the gate's logits, which see detached q/k (the LM loss never reaches the gate, and the TopK mask
        is not differentiable). Also returns the rotated keys and values, the gate logits f32 [B, N, I, J] (for
        the gate's distillation loss) and their target, the true pooled attention map f32 [B, N, I, J] (detached).
        """
        q, k, v = self.project_qkv(hidden)  # pre-RoPE: [B, T, N, H], [B, T, K, H], [B, T, K, H]
        q_rot, k_rot = apply_rope(q, positions, self.rope), apply_rope(k, positions, self.rope)
        logits = self.attn_gate(q, k)  # [B, N, I, J]; `pool` detaches q and k
        # Detach the inputs, not just the outputs: with symbolic-zero tangents JAX's JVP evaluates the pooling
        # kernel without asking it for a differentiation rule (the Mosaic kernel has none; remat re-linearises it).
        q_in, k_in, v_in = jax.lax.stop_gradient((q_rot, k_rot, v))
        _, target = attention_with_pooling_per_device(q_in, k_in, v_in, block_size=self.seer_config.gate.block_size)
        if self.is_sparse:
            block_mask = select_blocks(jax.lax.stop_gradient(logits), self.seer_config.selection)
            out = block_sparse_attention_per_device(q_rot, k_rot, v, block_mask)  # [B, T, N, H]
        else:
            out = self.attend(q_rot, k_rot, v, causal=True, key_mask=None)  # [B, T, N, H]
        return self._project_out(out), (k_rot, v), logits, target

    def _project_out(self, out: jax.Array) -> jax.Array:
        """Attention output [B, T, N, H] → o_proj → [B, T, D]."""
        batch, length = out.shape[:2]
        return self.o_proj(out.reshape(batch, length, self.num_q_heads * self.head_dim))  # [B, T, D]

    def _block_scores(
        self,
        q: jax.Array,
        k: jax.Array,
        q_rot: jax.Array,
        k_rot: jax.Array,
        v: jax.Array,
        lengths: jax.Array | None,
    ) -> jax.Array:
        """Block scores f32 [B, N, I, J] from the configured source; pre-RoPE q/k, rotated q/k and v row-aligned."""
        source, block_size = self.seer_config.source, self.seer_config.gate.block_size
        if source == "gate":
            return self.attn_gate(q, k, lengths=lengths)
        if source == "oracle":
            return baselines.oracle_scores(q_rot, k_rot, v, block_size=block_size)
        if source == "quest":
            return baselines.quest_scores(q_rot, k_rot, block_size=block_size, lengths=lengths)
        num_blocks = -(-q.shape[1] // block_size)
        shape = (q.shape[0], self.num_q_heads, num_blocks, num_blocks)
        if source == "streaming":
            return baselines.streaming_scores(shape)
        key = jax.random.fold_in(jax.random.key(self.seer_config.seed), self.layer_index)
        return baselines.random_scores(key, shape)


class SeerCausalLM(CausalLM):
    """A `CausalLM` whose attention layers are `SeerAttention`s (block-sparse prefill, dense decode).

    Args:
      config: the base architecture (sliding-window models are not supported).
      seer_config: the sparsity settings.
      attention_implementation, dtype, param_dtype, rngs: as for `CausalLM`. The base `Attention` modules that
        `CausalLM.__init__` builds are replaced, so build with `nnx.eval_shape` (or use `seer_from_base`) when the
        weights are loaded afterwards.
    """

    def __init__(
        self,
        config: ModelConfig,
        seer_config: SeerConfig,
        *,
        attention_implementation: str = "xla",
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if config.sliding_window is not None:
            raise ValueError("SeerAttention does not support sliding-window attention (config.sliding_window is set)")
        if seer_config.start_layer > config.num_layers:
            raise ValueError(
                f"seer_config.start_layer ({seer_config.start_layer}) exceeds the model's {config.num_layers} layers"
            )
        super().__init__(
            config, attention_implementation=attention_implementation, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.seer_config = seer_config
        for index, layer in enumerate(self.model.layers):
            layer.self_attn = SeerAttention(
                config,
                seer_config,
                layer_index=index,
                attention_implementation=attention_implementation,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )


def seer_with_abstract_gates(base: CausalLM, seer_config: SeerConfig) -> SeerCausalLM:
    """A `SeerCausalLM` holding `base`'s weights (the same arrays, not copies) and abstract gate weights.

    The gate weights are `jax.ShapeDtypeStruct`s (in the base weights' dtype) until filled, e.g. with
    `nnx.update(model, gate_state)`; `seer_from_base` and `seer_jax.adapters` do that. Dtypes and the attention
    implementation are `base`'s.
    """
    attention = base.model.layers[0].self_attn
    seer = nnx.eval_shape(
        lambda: SeerCausalLM(
            base.config,
            seer_config,
            attention_implementation=attention.attention_implementation,
            dtype=attention.q_proj.dtype,
            param_dtype=attention.q_proj.kernel.get_value().dtype,
            rngs=nnx.Rngs(0),
        )
    )
    nnx.update(seer, nnx.state(base, nnx.Param))
    return seer


def base_of(model: SeerCausalLM) -> CausalLM:
    """A plain `CausalLM` holding `model`'s base weights (the same arrays) and no gates: to save or export it."""
    attention = model.model.layers[0].self_attn
    base = nnx.eval_shape(
        lambda: CausalLM(
            model.config,
            attention_implementation=attention.attention_implementation,
            dtype=attention.q_proj.dtype,
            param_dtype=attention.q_proj.kernel.get_value().dtype,
            rngs=nnx.Rngs(0),
        )
    )
    nnx.update(base, nnx.state(model, nnx.All(nnx.Param, nnx.Not(GateParam))))
    return base


def seer_from_base(
    base: CausalLM, seer_config: SeerConfig, *, rngs: nnx.Rngs, gate_param_dtype: jnp.dtype | None = None
) -> SeerCausalLM:
    """A `SeerCausalLM` with `base`'s weights (shared, not copied) and freshly initialised gates (to distil).

    gate_param_dtype: the gates' parameter dtype; None uses the base weights' (train gates in float32: bf16 weights
    would round away most of AdamW's small updates).
    """
    seer = seer_with_abstract_gates(base, seer_config)
    param_dtype = gate_param_dtype or base.model.layers[0].self_attn.q_proj.kernel.get_value().dtype
    for layer in seer.model.layers:
        layer.self_attn.attn_gate = AttnGate(base.config, seer_config.gate, param_dtype=param_dtype, rngs=rngs)
    return seer


def _prefill_layers(
    model: SeerCausalLM,
    tokens: jax.Array,
    attention_mask: jax.Array | None,
    attention: Callable[[SeerAttention, jax.Array, jax.Array, jax.Array | None], tuple[jax.Array, Any]],
    *,
    remat: bool = False,
) -> tuple[jax.Array, list[Any]]:
    """Runs the decoder layers as `CausalLM.__call__` does without a cache, with `attention(self_attn, normed
    hidden, positions, key_mask) -> (output, extra)` in place of the attention; returns the last layer's output
    [B, T, D] (before the final norm) and each layer's extra. `remat` recomputes each layer in a backward pass."""
    if not isinstance(model, SeerCausalLM):
        raise ValueError(f"expected a SeerCausalLM, got {type(model).__name__}")
    token_mask = jnp.ones(tokens.shape, bool) if attention_mask is None else attention_mask.astype(bool)  # [B, T]
    key_mask = None if attention_mask is None else token_mask
    positions = positions_from_mask(token_mask)  # [B, T]
    hidden = model.model.embed_tokens(tokens)  # [B, T, D]

    def layer_forward(layer, hidden, positions, key_mask):
        out, extra = attention(layer.self_attn, layer.input_layernorm(hidden), positions, key_mask)
        hidden = hidden + out
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden)), extra  # [B, T, D]

    step = nnx.remat(layer_forward) if remat else layer_forward
    extras = []
    for layer in model.model.layers:
        hidden, extra = step(layer, hidden, positions, key_mask)
        extras.append(extra)
    return hidden, extras


def _last_rows_of_each_row(lengths: jax.Array, num_blocks: int) -> jax.Array:
    """bool [B, 1, I, J]: the causal blocks of the last NUM_DENSE_LAST_ROWS real query-block rows of each row.

    lengths: int [B] real tokens per row, in row-aligned block coordinates.
    """
    last_block = (lengths - 1) // BLOCK_SIZE  # [B]
    rows = jnp.arange(num_blocks)[None, :]  # [1, I]
    dense_rows = (rows > last_block[:, None] - NUM_DENSE_LAST_ROWS) & (rows <= last_block[:, None])  # [B, I]
    return (dense_rows[:, :, None] & causal_block_mask(num_blocks, num_blocks))[:, None]  # [B, 1, I, J]


def _real_block_density(block_mask: jax.Array, lengths: jax.Array) -> jax.Array:
    """f32 [N]: selected / causal blocks over the query blocks that hold a real token of their row.

    block_mask: bool [B, N, I, J] in row-aligned block coordinates; lengths: int [B] real tokens per row.
    """
    num_q_blocks, num_kv_blocks = block_mask.shape[-2:]
    real_rows = jnp.arange(num_q_blocks)[None, :] * BLOCK_SIZE < lengths[:, None]  # [B, I]
    counted = real_rows[:, :, None] & causal_block_mask(num_q_blocks, num_kv_blocks)  # [B, I, J]
    selected = jnp.sum(block_mask & counted[:, None], axis=(0, 2, 3), dtype=jnp.float32)  # [N]
    return selected / jnp.sum(counted)


def block_density(model: SeerCausalLM, tokens: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """f32 [L, N]: the fraction of causal 64×64 blocks each layer and head computes in this batch's prefill.

    Counts the query blocks holding real tokens of each row, pooled over the batch; 1.0 in dense layers.
    tokens: int [B, T]; attention_mask: bool [B, T] left padding, or None.
    """
    _, densities = _prefill_with_density(model, tokens, attention_mask)
    return jnp.stack(densities)  # [L, N]


def logits_and_density(
    model: SeerCausalLM, tokens: jax.Array, attention_mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """`model(tokens, attention_mask=attention_mask)[0]` and `block_density(model, tokens, attention_mask)` from one
    prefill: logits [B, T, V] in the compute dtype and f32 [L, N]."""
    hidden, densities = _prefill_with_density(model, tokens, attention_mask)
    return model.unembed(hidden), jnp.stack(densities)  # [B, T, V], [L, N]


def _prefill_with_density(
    model: SeerCausalLM, tokens: jax.Array, attention_mask: jax.Array | None
) -> tuple[jax.Array, list[jax.Array]]:
    """The last layer's output [B, T, D] and each layer's density f32 [N] (see `block_density`)."""
    batch, length = tokens.shape
    lengths = jnp.full((batch,), length) if attention_mask is None else jnp.sum(attention_mask.astype(bool), axis=-1)

    def attention(self_attn, normed, positions, key_mask):
        out, _, block_mask = self_attn.prefill(normed, positions, key_mask=key_mask)
        return out, _real_block_density(block_mask, lengths)

    return _prefill_layers(model, tokens, attention_mask, attention)


def distillation_inputs(
    model: SeerCausalLM, tokens: jax.Array, attention_mask: jax.Array | None = None
) -> tuple[tuple[GateFeatures, ...], tuple[jax.Array, ...]]:
    """Per layer, the gate's `GateFeatures` and its target (the true pooled attention map, f32 [B, N, I, J]).

    One dense forward (see `SeerAttention.prefill_with_target`); no gradient flows into the features. Call it
    outside the differentiated function: the loss needs only `gate_logits(model, features)` and the targets.
    """

    def attention(self_attn, normed, positions, key_mask):
        out, _, features, target = self_attn.prefill_with_target(normed, positions, key_mask=key_mask)
        return out, (features, target)

    _, per_layer = _prefill_layers(model, tokens, attention_mask, attention)
    return tuple(features for features, _ in per_layer), tuple(target for _, target in per_layer)


def sparse_training_forward(
    model: SeerCausalLM, tokens: jax.Array, *, remat: bool = False
) -> tuple[jax.Array, tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """Logits [B, T, V] of the block-sparse model, and per layer the gate logits and their pooled-attention targets
    (see `SeerAttention.prefill_for_training`): everything the fine-tuning loss needs, from one forward. `remat`
    recomputes each decoder layer in the backward pass (`nnx.remat`): activation memory of one layer, not all."""

    def attention(self_attn, normed, positions, key_mask):
        del key_mask  # unpadded rows only
        out, _, logits, target = self_attn.prefill_for_training(normed, positions)
        return out, (logits, target)

    hidden, per_layer = _prefill_layers(model, tokens, None, attention, remat=remat)
    return model.unembed(hidden), tuple(lg for lg, _ in per_layer), tuple(tg for _, tg in per_layer)


def gate_logits(model: SeerCausalLM, features: Sequence[GateFeatures]) -> tuple[jax.Array, ...]:
    """Each layer's gate logits f32 [B, N, I, J] from its `GateFeatures` (`AttnGate.score`)."""
    layers = model.model.layers
    if len(features) != len(layers):
        raise ValueError(f"expected GateFeatures for each of the {len(layers)} layers, got {len(features)}")
    return tuple(
        layer.self_attn.attn_gate.score(layer_features) for layer, layer_features in zip(layers, features, strict=True)
    )
