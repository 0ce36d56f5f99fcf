"""SeerAttention models: a `CausalLM` whose attention layers carry an AttnGate and prefill block-sparsely, and
optionally a SeerAttention-R decode gate with which they decode block-sparsely.

    SeerCausalLM(CausalLM)
      model.layers[i].self_attn: SeerAttention(Attention)     q/k/v/o projections as in `Attention`
        attn_gate: AttnGate | None                              mask_linear_k (+ mask_linear_q) weights, GateParam
        decode_gate: DecodeAttnGate | None                      attngate_linear_q/k (+ attngate_q/knorm), GateParam

so the prefill gates sit at the official paths (`model.layers.{i}.self_attn.attn_gate.mask_linear_k.weight`) and
the decode gates at the official SeerAttention-R paths with `attn_gate` read as `decode_gate`
(`seer_jax.decode_gate.official_name`).

One forward. `SeerAttention` overrides `causal_attention`, the attention of a forward without a cache, and the two
decode hooks (`decode_state`, `decode_attention`); the projections, RoPE, the layer loop and the decode loop are
`seer_jax.model`'s and `seer_jax.generate`'s. In layers i >= `start_layer`:
    block scores [B, N, I, J] from the configured source (`seer_jax.block_scores.SOURCES`) → `select_blocks`
    (`seer_jax.sparsity`) → `block_sparse_attention` on the rotated q/k and v.
Layers below `start_layer` attend densely; their gates exist (an adapter holds every layer's weights) but select
nothing. Without prefill gates (`seer_config.gate` None, e.g. decode gates only) every layer prefills densely.
With a dense selection (nz_ratio 1, threshold 0) every causal block is computed and the logits equal the dense
model's.

Sparse decoding (`seer_config.decode`, docs/design.md "Sparse decoding"). `decode_state` compresses the prompt's
pre-RoPE keys (and, with `decode.quest_weight` > 0, bounds its rotated keys per block) into a `KCompressionCache`
(`seer_jax.k_compression`), which the `KVCache` carries; each decode step
(`decode_attention`) adds the new key to it, scores the compressed blocks with the decode gate, selects blocks
(`seer_jax.decode_selection`; with the layer's own budget, `DecodeConfig.for_layer`, when `decode.allocation`
shares it among layers) and attends the selected blocks only (`pallas_kernels.block_sparse_decode` with each row's
first real slot as its start; a per-query-head selection, Quest's, by dense attention under its key mask).
`decode.source` swaps the decode gate for another score source (`seer_jax.decode_scores`: oracle, Quest,
StreamingLLM, random), which needs no compressed keys. Layers below `decode.start_layer` decode densely and keep no
compressed keys. Without `decode`, decode steps are dense in every layer. Prefill and decode sparsity are
independent: either can be dense.

What else a layer produces is asked for by name (`CausalLM.forward(..., collect=...)`, names in `COLLECTABLE`):
    "gate_features"  the gate's `GateFeatures` (block-pooled pre-RoPE q/k): distillation's input
    "gate_logits"    the gate's logits f32 [B, N, I, J] (fine-tuning's gate loss)
    "block_scores"   the scores the layer's selection ranks f32 [B, N, I, J] (its source's; for the gate with a
                     `quest_weight`, logits plus the weighted quest scores), even when the selection keeps every
                     block (calibration)
    "target"         the true row-normalised max-pooled attention map f32 [B, N, I, J], the gate's distillation
                     target (docs/design.md, "Distillation"); no gradient flows into it
    "density"        f32 [N], the fraction of causal blocks computed over the query blocks holding real tokens
    "block_mask"     bool [B, N, I, J], the computed blocks in each row's own block coordinates
With a decode config, a layer also collects its decode gate's distillation inputs (`seer_jax.decode_target`), in
row-aligned coordinates whatever the prefill computes:
    "decode_features"  the decode gate's `DecodeFeatures` (pre-RoPE q, pooled k blocks, row lengths)
    "decode_target"    the per-token target f32 [B, K, T, J] (no gradient flows into it)
    "decode_quest"     each token's group-max Quest bound f32 [B, K, T, J] (`decode_scores.quest_token_bounds`, over
                       the row's block bounds in the compute dtype): `DecodeFeatures.quest`, for distilling the
                       hybrid (gate + quest_weight × bound)
On a decode step a layer collects `DECODE_COLLECTABLE`:
    "decode_blocks"  f32 [2]: the blocks attended and the blocks holding real tokens, summed over rows and heads
                     (the selection's: kv heads, or query heads for a per-query-head source such as quest)
A layer that attends densely (below `start_layer`, or a selection keeping every block) and is asked for the target
gets its output and the target from one `attention_with_pooling` call: distillation's forward is the base model's.
`seer_jax.forwards` holds that forward with each use's fixed `collect` (distillation, fine-tuning, evaluation).

Left padding. The block-sparse kernel has no key mask, so each row is moved to start at its first real token
(padding rotated to the end of the row), attended there, and moved back; blocks, gate pooling and RoPE block
positions then count real tokens only, so a left-padded row gets exactly the blocks and outputs it would get
unpadded and never attends to padding (docs/design.md, "Deviations"). TopK keeps k = f(nz_ratio, J) blocks per row
with J counted over the padded length, as the official code, so the shorter rows of a padded batch come out denser.
Padding positions get finite garbage, as in the dense model. `attention_mask` must be left padding.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from seer_jax.attention import dot_product_attention
from seer_jax.block_scores import SOURCES, ScoreInputs
from seer_jax.config import ModelConfig
from seer_jax.decode_gate import DecodeAttnGate
from seer_jax.decode_scores import DECODE_SOURCES, DecodeScoreInputs, quest_token_bounds
from seer_jax.decode_selection import (
    available_blocks,
    decode_block_lists,
    decode_key_mask,
    max_selected_blocks,
    select_decode_blocks,
)
from seer_jax.decode_target import DecodeFeatures, decode_target_per_device
from seer_jax.gate import AttnGate, GateParam
from seer_jax.head_parallel import (
    attention_with_pooling_per_device,
    block_sparse_attention_per_device,
    block_sparse_decode_per_device,
)
from seer_jax.k_compression import KCompressionCache, append_token, block_key_bounds, compress_prompt
from seer_jax.model import Attention, CausalLM
from seer_jax.seer_config import SeerConfig
from seer_jax.sparsity import BLOCK_SIZE, causal_block_mask, select_blocks
from seer_jax.sparsity import block_density as mask_density

DECODE_TRAINING_COLLECTABLE = ("decode_features", "decode_target", "decode_quest")
COLLECTABLE = (
    "gate_features",
    "gate_logits",
    "block_scores",
    "target",
    "density",
    "block_mask",
    *DECODE_TRAINING_COLLECTABLE,
)
_SCORE_COLLECTABLE = {"gate_features", "gate_logits", "block_scores"}  # computed from the row-aligned inputs
DECODE_COLLECTABLE = ("decode_blocks",)


class RowLayout:
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
    """`Attention` with an AttnGate (`attn_gate`) and block-sparse prefill, and with `seer_config.decode` a decode
    gate (`decode_gate`) and block-sparse decode steps; otherwise decode steps are dense.

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
        gate = seer_config.gate
        self.attn_gate = None if gate is None else AttnGate(config, gate, param_dtype=param_dtype, rngs=rngs)
        decode = seer_config.decode
        self.decode_gate = (
            None if decode is None else DecodeAttnGate(config, decode, param_dtype=param_dtype, rngs=rngs)
        )
        self.seer_config = seer_config
        self.layer_index = layer_index

    @property
    def is_sparse(self) -> bool:
        """Whether this layer's prefill is block-sparse (prefill gates and layer_index >= start_layer)."""
        return self.attn_gate is not None and self.layer_index >= self.seer_config.start_layer

    @property
    def is_sparse_decode(self) -> bool:
        """Whether this layer's decode steps are block-sparse (a decode config and layer_index >= its start_layer)."""
        decode = self.seer_config.decode
        return decode is not None and self.layer_index >= decode.start_layer

    def decode_state(self, k: jax.Array, k_rot: jax.Array, *, key_mask: jax.Array | None) -> KCompressionCache | None:
        """The prompt's compressed keys in a layer that decodes sparsely with the decode gate (None otherwise: dense
        decoding and the other score sources need none); arguments as `Attention.decode_state`."""
        if not self.is_sparse_decode or self.seer_config.decode.source != "gate":
            return None
        batch, length = k.shape[:2]
        rows = RowLayout(key_mask, length)
        lengths = jnp.full((batch,), length, jnp.int32) if rows.lengths is None else rows.lengths  # [B]
        k_rot = rows.align(k_rot) if self.seer_config.decode.keeps_key_bounds else None
        return compress_prompt(self.decode_gate, rows.align(k), lengths, k_rot)

    def decode_attention(
        self,
        q: jax.Array,
        k: jax.Array,
        q_rot: jax.Array,
        k_rot: jax.Array,
        k_cache: jax.Array,
        v_cache: jax.Array,
        *,
        key_mask: jax.Array,
        state: KCompressionCache | None,
        collect: frozenset[str],
    ) -> tuple[jax.Array, KCompressionCache | None, dict[str, jax.Array]]:
        """A decode step over the blocks that `decode.source` scores and `decode_selection` selects (dense below
        `decode.start_layer` or without a decode config); arguments as `Attention.decode_attention`, `collect` from
        `DECODE_COLLECTABLE`."""
        unknown = sorted(collect - set(DECODE_COLLECTABLE))
        if unknown:
            raise ValueError(
                f"cannot collect {unknown} on a decode step: a SeerAttention layer collects {DECODE_COLLECTABLE}"
            )
        lengths = jnp.sum(key_mask, axis=-1, dtype=jnp.int32)  # [B] real tokens, the new one included
        decode = self.seer_config.decode
        block_size = BLOCK_SIZE if decode is None else decode.block_size
        available = jnp.sum(available_blocks(lengths, block_size))  # per head
        if not self.is_sparse_decode:
            out = self.attend(q_rot, k_cache, v_cache, causal=False, key_mask=key_mask)  # [B, 1, N, H]
            selected = available = self.num_kv_heads * available
        else:
            if decode.source == "gate":
                state = append_token(state, self.decode_gate, k, lengths - 1, k_rot.astype(k_cache.dtype))
            inputs = DecodeScoreInputs(
                q=q,
                q_rot=q_rot,
                k_cache=k_cache,
                key_mask=key_mask,
                gate=self.decode_gate,
                state=state,
                key=jax.random.fold_in(jax.random.key(self.seer_config.seed), self.layer_index),
            )
            scores = DECODE_SOURCES[decode.source](inputs)  # [B, K, J], or [B, N, J] per query head (quest)
            layer_decode = decode.for_layer(self.layer_index)
            if scores.shape[1] == self.num_kv_heads:  # block lists straight from the scores, for the decode kernel
                num_slots = max_selected_blocks(layer_decode, scores.shape[-1])
                index, count = decode_block_lists(scores, lengths, layer_decode, num_slots)  # [B, K, M], [B, K]
                out = self._attend_blocks(q_rot, k_cache, v_cache, index, count, key_mask)  # [B, 1, N, H]
                selected = jnp.sum(count)
            else:  # per query head: the decode kernel shares a selection by the query heads of a kv head
                block_mask = select_decode_blocks(scores, lengths, layer_decode)  # [B, N, J]
                allowed = decode_key_mask(block_mask, key_mask, decode.block_size)  # [B, N, S]
                out = self._attend_selected(q_rot, k_cache, v_cache, allowed)  # [B, 1, N, H]
                selected = jnp.sum(block_mask)
            available = scores.shape[1] * available
        collected = {}
        if "decode_blocks" in collect:
            collected["decode_blocks"] = jnp.stack([selected, available]).astype(jnp.float32)  # [2]
        return out, state, collected

    def _attend_blocks(
        self,
        q_rot: jax.Array,
        k_cache: jax.Array,
        v_cache: jax.Array,
        block_index: jax.Array,
        block_count: jax.Array,
        key_mask: jax.Array,
    ) -> jax.Array:
        """Rotated q [B, 1, N, H] over the blocks listed per kv head (block_index int32 [B, K, M] with block_count
        [B, K], each row's own block coordinates: `decode_block_lists`) of the left-padded cache [B, S, K, H] (real
        slots `key_mask` [B, S]) → [B, 1, N, H].

        `pallas_kernels.block_sparse_decode` reads the listed blocks only: row b's real tokens are contiguous from
        its first real slot (left padding, then every decoded token), so that slot is the row's `starts` and its
        own block j is slots starts + j · block_size ….
        """
        lengths = jnp.sum(key_mask, axis=-1, dtype=jnp.int32)  # [B]
        starts = jnp.argmax(key_mask, axis=-1).astype(jnp.int32)  # [B] the first real slot
        out = block_sparse_decode_per_device(
            q_rot[:, 0],
            k_cache,
            v_cache,
            lengths,
            block_index,
            block_count,
            starts,
            block_size=self.seer_config.decode.block_size,
        )  # [B, N, H]
        return out[:, None]  # [B, 1, N, H]

    def _attend_selected(
        self, q_rot: jax.Array, k_cache: jax.Array, v_cache: jax.Array, allowed: jax.Array
    ) -> jax.Array:
        """Rotated q [B, 1, N, H] over the cache [B, S, K, H] where allowed → [B, 1, N, H]; `allowed` is bool
        [B, K, S] (per kv head, shared by its query heads) or [B, N, S] (per query head).

        Dense attention under each head's key mask, the mask's heads folded into the batch (per query head, each
        query head gets its own copy of its kv head's keys and values). Exact, O(S) per step: the path of
        per-query-head selections (Quest), which the decode kernel does not serve; per-kv-head selections go
        through `_attend_blocks`.
        """
        batch, _, num_q_heads, head_dim = q_rot.shape
        num_keys, num_kv_heads = k_cache.shape[1:3]
        num_heads = allowed.shape[1]  # K, or N for per-query-head masks
        if num_heads != num_kv_heads:
            k_cache = jnp.repeat(k_cache, num_q_heads // num_kv_heads, axis=2)  # [B, S, N, H]
            v_cache = jnp.repeat(v_cache, num_q_heads // num_kv_heads, axis=2)  # [B, S, N, H]
        group = num_q_heads // num_heads
        q = q_rot.reshape(batch * num_heads, 1, group, head_dim)  # [B·K, 1, G, H] (or [B·N, 1, 1, H])
        k = k_cache.transpose(0, 2, 1, 3).reshape(batch * num_heads, num_keys, 1, head_dim)  # [B·K, S, 1, H]
        v = v_cache.transpose(0, 2, 1, 3).reshape(batch * num_heads, num_keys, 1, head_dim)  # [B·K, S, 1, H]
        out = dot_product_attention(
            q,
            k,
            v,
            causal=False,
            key_mask=allowed.reshape(batch * num_heads, num_keys),
            implementation=self.attention_implementation,
        )  # [B·K, 1, G, H]
        return out.reshape(batch, 1, num_q_heads, head_dim)  # [B, 1, N, H]

    def causal_attention(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        q_rot: jax.Array,
        k_rot: jax.Array,
        *,
        key_mask: jax.Array | None,
        collect: frozenset[str],
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Block-sparse causal attention (dense below `start_layer`); arguments as `Attention.causal_attention`,
        `collect` from `COLLECTABLE` (module docstring)."""
        unknown = sorted(collect - set(COLLECTABLE))
        if unknown:
            raise ValueError(f"cannot collect {unknown}: a SeerAttention layer collects {COLLECTABLE}")
        if self.attn_gate is None and collect & _SCORE_COLLECTABLE:
            raise ValueError(f"cannot collect {sorted(_SCORE_COLLECTABLE)}: this model has no prefill gates")
        decode_names = collect & set(DECODE_TRAINING_COLLECTABLE)
        if decode_names and self.decode_gate is None:
            raise ValueError(f"cannot collect {sorted(decode_names)}: the model has no decode gates (no decode config)")
        collect = collect - decode_names
        selection, block_size = self.seer_config.selection.for_layer(self.layer_index), BLOCK_SIZE
        batch, length = q.shape[:2]
        num_blocks = -(-length // block_size)
        every_block = jnp.broadcast_to(
            causal_block_mask(num_blocks, num_blocks), (batch, self.num_q_heads, num_blocks, num_blocks)
        )
        attends_densely = not self.is_sparse or selection.is_dense
        fused_target = "target" in collect and attends_densely
        if not self.is_sparse and not fused_target and not collect & _SCORE_COLLECTABLE:
            out, block_mask, rows = self.attend(q_rot, k_rot, v, causal=True, key_mask=key_mask), every_block, None
            collected = {}
        else:
            rows = RowLayout(key_mask, length)
            inputs = ScoreInputs(
                q=rows.align(q),
                k=rows.align(k),
                q_rot=rows.align(q_rot),
                k_rot=rows.align(k_rot),
                v=rows.align(v),
                lengths=rows.lengths,
                gate=self.attn_gate,
                key=jax.random.fold_in(jax.random.key(self.seer_config.seed), self.layer_index),
                quest_weight=self.seer_config.quest_weight,
            )
            out, block_mask, collected = self._attend_rows(inputs, every_block, collect, fused_target)
            out = rows.restore(out)
        if "density" in collect:
            collected["density"] = mask_density(block_mask, None if rows is None else rows.lengths)
        if "block_mask" in collect:
            collected["block_mask"] = block_mask
        if decode_names:
            collected.update(self._decode_training_values(q, k, q_rot, k_rot, key_mask, decode_names))
        return out, collected

    def _decode_training_values(
        self,
        q: jax.Array,
        k: jax.Array,
        q_rot: jax.Array,
        k_rot: jax.Array,
        key_mask: jax.Array | None,
        names: frozenset[str],
    ) -> dict[str, jax.Array | DecodeFeatures]:
        """The decode gate's distillation inputs (`DECODE_TRAINING_COLLECTABLE`) in row-aligned coordinates."""
        batch, length = q.shape[:2]
        rows = RowLayout(key_mask, length)
        lengths = jnp.full((batch,), length, jnp.int32) if rows.lengths is None else rows.lengths  # [B]
        values = {}
        if "decode_features" in names:
            aligned_k = rows.align(k)  # [B, T, K, H]
            values["decode_features"] = DecodeFeatures(
                q=jax.lax.stop_gradient(rows.align(q)),
                k=self.decode_gate.pool(aligned_k, lengths=lengths),
                lengths=lengths,
            )
        block_size = self.seer_config.decode.block_size
        q_rot_rows, k_rot_rows = jax.lax.stop_gradient((rows.align(q_rot), rows.align(k_rot)))  # inputs: no gradient
        if "decode_quest" in names:
            bounds = block_key_bounds(k_rot_rows, lengths, block_size)  # [B, K, J, 2, H]
            values["decode_quest"] = quest_token_bounds(q_rot_rows, bounds)  # [B, K, T, J]
        if "decode_target" in names:
            values["decode_target"] = decode_target_per_device(
                q_rot_rows, k_rot_rows, block_size=block_size, lengths=rows.lengths
            )
        return values

    def _attend_rows(
        self, inputs: ScoreInputs, every_block: jax.Array, collect: frozenset[str], fused_target: bool
    ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """Attention over row-aligned inputs → (out [B, T, N, H] row-aligned, block mask [B, N, I, J], collected)."""
        selection, source = self.seer_config.selection.for_layer(self.layer_index), self.seer_config.source
        collected = {}
        scores = None
        if self.is_sparse and not selection.is_dense:
            scores = SOURCES[source](inputs)  # [B, N, I, J]
        if "gate_features" in collect:
            collected["gate_features"] = self.attn_gate.pool(inputs.q, inputs.k, lengths=inputs.lengths)
        if "block_scores" in collect:  # the selection's scores; computed here when the selection did not need them
            collected["block_scores"] = SOURCES[source](inputs) if scores is None else scores
        if "gate_logits" in collect:
            reuse = scores is not None and source == "gate" and inputs.quest_weight == 0
            collected["gate_logits"] = scores if reuse else self.attn_gate(inputs.q, inputs.k, lengths=inputs.lengths)
        block_size = BLOCK_SIZE
        if fused_target:
            out, collected["target"] = attention_with_pooling_per_device(
                inputs.q_rot,
                inputs.k_rot,
                inputs.v,
                block_size=block_size,
                implementation=self.attention_implementation,
            )
            return out, every_block, collected
        if not self.is_sparse:
            block_mask = every_block
            out = self.attend(inputs.q_rot, inputs.k_rot, inputs.v, causal=True, key_mask=None)  # [B, T, N, H]
        else:
            if scores is None:
                block_mask = every_block
            else:  # a boolean mask: no gradient flows through the selection
                block_mask = select_blocks(jax.lax.stop_gradient(scores), selection, inputs.lengths)
            out = block_sparse_attention_per_device(inputs.q_rot, inputs.k_rot, inputs.v, block_mask)  # [B, T, N, H]
        if "target" in collect:
            # Detach the inputs, not just the outputs: with symbolic-zero tangents JAX's JVP evaluates the pooling
            # kernel without asking it for a differentiation rule.
            detached = jax.lax.stop_gradient((inputs.q_rot, inputs.k_rot, inputs.v))
            _, collected["target"] = attention_with_pooling_per_device(*detached, block_size=block_size)
        return out, block_mask, collected


class SeerCausalLM(CausalLM):
    """A `CausalLM` whose attention layers are `SeerAttention`s (block-sparse prefill; block-sparse decode with
    `seer_config.decode`, dense without).

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
        if seer_config.decode is not None and seer_config.decode.start_layer > config.num_layers:
            raise ValueError(
                f"seer_config.decode.start_layer ({seer_config.decode.start_layer}) exceeds the model's "
                f"{config.num_layers} layers"
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


def _abstract_like(base: CausalLM, build) -> nnx.Module:
    """`build(attention_implementation, dtype, param_dtype)` under `nnx.eval_shape`, with `base`'s settings."""
    attention = base.model.layers[0].self_attn
    return nnx.eval_shape(
        lambda: build(
            attention_implementation=attention.attention_implementation,
            dtype=attention.q_proj.dtype,
            param_dtype=attention.q_proj.kernel.get_value().dtype,
            rngs=nnx.Rngs(0),
        )
    )


def seer_with_abstract_gates(base: CausalLM, seer_config: SeerConfig) -> SeerCausalLM:
    """A `SeerCausalLM` holding `base`'s weights (the same arrays, not copies) and abstract gate weights.

    The gate weights are `jax.ShapeDtypeStruct`s (in the base weights' dtype) until filled, e.g. with
    `nnx.update(model, gate_state)`; `seer_from_base` and `seer_jax.adapters` do that. Dtypes and the attention
    implementation are `base`'s.
    """
    seer = _abstract_like(base, lambda **settings: SeerCausalLM(base.config, seer_config, **settings))
    nnx.update(seer, nnx.state(base, nnx.Param))
    return seer


def base_of(model: SeerCausalLM) -> CausalLM:
    """A plain `CausalLM` holding `model`'s base weights (the same arrays) and no gates: to save or export it."""
    base = _abstract_like(model, lambda **settings: CausalLM(model.config, **settings))
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
        if seer_config.gate is not None:
            layer.self_attn.attn_gate = AttnGate(base.config, seer_config.gate, param_dtype=param_dtype, rngs=rngs)
        if seer_config.decode is not None:
            layer.self_attn.decode_gate = DecodeAttnGate(
                base.config, seer_config.decode, param_dtype=param_dtype, rngs=rngs
            )
    return seer
