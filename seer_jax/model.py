"""Llama-family causal LM in Flax NNX (Llama 3.x, Mistral, Qwen2, Qwen3), mirroring HF's module tree.

    CausalLM
      model: DecoderStack
        embed_tokens: Embedding                      embedding [V, D]
        layers[i]: DecoderLayer
          input_layernorm: RMSNorm                   scale [D]
          self_attn: Attention
            q_proj / k_proj / v_proj: Linear         kernel [D, N·H] / [D, K·H] / [D, K·H] (+ bias, Qwen2)
            q_norm / k_norm: RMSNorm                 scale [H] (Qwen3 only)
            o_proj: Linear                           kernel [N·H, D]
          post_attention_layernorm: RMSNorm          scale [D]
          mlp: MLP
            gate_proj / up_proj: Linear              kernel [D, F]
            down_proj: Linear                        kernel [F, D]
        norm: RMSNorm                                scale [D]
      lm_head: Linear                                kernel [D, V] (None when tied to embed_tokens)

so the state path of HF's `model.layers.3.self_attn.q_proj.weight` is `('model', 'layers', 3, 'self_attn', 'q_proj',
'kernel')`.

`CausalLM.forward(tokens, ...)` is the one loop over the layers (`__call__` is `forward` without the collected
values). It runs in one of two modes:
- no cache: a causal forward over T tokens (left padding marked by `attention_mask`); the returned `KVCache` holds
  the T rotated keys/values (pad it with `KVCache.padded_to` to decode further);
- with a cache: one decode step (T = 1) that writes slot `cache.length` and attends over the cache.

`Attention.__call__` is the one place where q, k, v are projected (`project_qkv`: pre-RoPE q [B, T, N, H] and
k [B, T, K, H] after Qwen2's bias and Qwen3's q/k norm, the inputs of an AttnGate) and rotated (`apply_rope`). It
then hands them to one of two hooks, which a subclass overrides to change the attention math:
- `causal_attention(...)` without a cache (here: dense, `seer_jax.attention.dot_product_attention`);
- `decode_attention(...)` with one (here: dense over the filled cache slots).

A layer may keep state for decoding besides its keys and values (SeerAttention-R's compressed keys): the hook
`decode_state` builds it from a causal forward's pre-RoPE keys (here: None), the `KVCache` carries it
(`decode_states`), and `decode_attention` receives and returns it.

`collect` names per-layer values that a subclass can produce besides its output (`seer_jax.seer.COLLECTABLE`:
gate features, gate logits, distillation targets, block density, block masks; `seer_jax.seer.DECODE_COLLECTABLE`
on a decode step); `forward` returns them, one dict per layer. The plain model collects nothing.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seer_jax.attention import IMPLEMENTATIONS, dot_product_attention
from seer_jax.config import ModelConfig
from seer_jax.head_parallel import per_device_heads
from seer_jax.kv_cache import KVCache
from seer_jax.layers import Embedding, Linear, RMSNorm
from seer_jax.rope import apply_rope


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """int32 [B, T] RoPE positions of a left-padded batch: cumsum(mask) - 1, clipped to 0 on padding (like HF)."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=-1, dtype=jnp.int32) - 1, 0)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE, optional q/k/v biases and optional per-head q/k RMSNorm."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        attention_implementation: str,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        if attention_implementation not in IMPLEMENTATIONS:
            raise ValueError(f"attention_implementation {attention_implementation!r} is not one of {IMPLEMENTATIONS}")
        hidden, head_dim = config.hidden_size, config.head_dim
        num_q_heads, num_kv_heads = config.num_q_heads, config.num_kv_heads

        def linear(in_features: int, out_features: int, use_bias: bool, sharding: tuple[str, str]) -> Linear:
            return Linear(
                in_features,
                out_features,
                use_bias=use_bias,
                sharding=sharding,
                initializer_range=config.initializer_range,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )

        self.q_proj = linear(hidden, num_q_heads * head_dim, config.qkv_bias, ("embed", "q_heads"))
        self.k_proj = linear(hidden, num_kv_heads * head_dim, config.qkv_bias, ("embed", "kv_heads"))
        self.v_proj = linear(hidden, num_kv_heads * head_dim, config.qkv_bias, ("embed", "kv_heads"))
        self.o_proj = linear(num_q_heads * head_dim, hidden, config.o_proj_bias, ("q_heads", "embed"))
        norm = dict(eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.q_norm = RMSNorm(head_dim, **norm) if config.qk_norm else None
        self.k_norm = RMSNorm(head_dim, **norm) if config.qk_norm else None
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.rope = config.rope
        self.attention_implementation = attention_implementation

    def project_qkv(self, hidden: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """hidden [B, T, D] → pre-RoPE q [B, T, N, H], k [B, T, K, H], v [B, T, K, H]."""
        batch, length, _ = hidden.shape
        q = self.q_proj(hidden).reshape(batch, length, self.num_q_heads, self.head_dim)  # [B, T, N, H]
        k = self.k_proj(hidden).reshape(batch, length, self.num_kv_heads, self.head_dim)  # [B, T, K, H]
        v = self.v_proj(hidden).reshape(batch, length, self.num_kv_heads, self.head_dim)  # [B, T, K, H]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def attend(
        self, q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, key_mask: jax.Array | None
    ) -> jax.Array:
        """Dense attention: rotated q [B, T, N, H], k/v [B, S, K, H] → [B, T, N, H], each device on its heads."""

        def attention(q, k, v, key_mask):
            return dot_product_attention(
                q, k, v, causal=causal, key_mask=key_mask, implementation=self.attention_implementation
            )

        return per_device_heads(attention, [(q, "BTNH"), (k, "BSKH"), (v, "BSKH"), (key_mask, "BS")], "BTNH")

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
        """The attention of a causal forward over T tokens: dense here.

        Args:
          q, k: pre-RoPE queries [B, T, N, H] and keys [B, T, K, H]; v: values [B, T, K, H].
          q_rot, k_rot: q and k after RoPE.
          key_mask: bool [B, T] (left padding), or None.
          collect: names of extra per-layer values to return; a plain `Attention` has none.

        Returns:
          The attention output [B, T, N, H] (before o_proj) and the collected values by name.
        """
        del q, k  # the pre-RoPE q/k feed gates, which a plain attention layer has none of
        if collect:
            raise ValueError(f"a dense Attention layer collects nothing, asked for {sorted(collect)}")
        return self.attend(q_rot, k_rot, v, causal=True, key_mask=key_mask), {}

    def decode_state(self, k: jax.Array, k_rot: jax.Array, *, key_mask: jax.Array | None) -> Any:
        """The state a decode step of this layer needs besides the KV cache, built from a causal forward's pre-RoPE
        keys k [B, T, K, H] and the same keys after RoPE k_rot (key_mask: bool [B, T] left padding, or None); None:
        a plain layer needs none."""
        del k, k_rot, key_mask
        return None

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
        state: Any,
        collect: frozenset[str],
    ) -> tuple[jax.Array, Any, dict[str, jax.Array]]:
        """One decode step's attention: dense here.

        Args:
          q, k: the new token's pre-RoPE query [B, 1, N, H] and key [B, 1, K, H] (a gate's inputs).
          q_rot, k_rot: q and k after RoPE.
          k_cache, v_cache: the cache [B, S, K, H], the new token's rotated key and value already written.
          key_mask: bool [B, S], the real slots (the new token's included).
          state: the layer's decode state (`decode_state`, updated by earlier steps).
          collect: names of extra per-layer values to return; a plain `Attention` has none.

        Returns:
          The attention output [B, 1, N, H] (before o_proj), the updated state, and the collected values by name.
        """
        del q, k, k_rot  # they feed gates and their caches, which a plain attention layer has none of
        if collect:
            raise ValueError(f"a dense Attention layer's decode step collects nothing, asked for {sorted(collect)}")
        return self.attend(q_rot, k_cache, v_cache, causal=False, key_mask=key_mask), state, {}

    def __call__(
        self,
        hidden: jax.Array,
        positions: jax.Array,
        *,
        key_mask: jax.Array | None,
        cache: tuple[jax.Array, jax.Array, Any] | None = None,
        cache_index: jax.Array | None = None,
        collect: frozenset[str] = frozenset(),
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array, Any], dict[str, jax.Array]]:
        """Self-attention block.

        Args:
          hidden: [B, T, D], already normalised.
          positions: int [B, T] RoPE positions.
          key_mask: bool [B, S] valid keys (S = T without a cache, the cache size with one), or None if all are.
          cache: this layer's (keys, values) buffers [B, S, K, H] and decode state, or None for a causal forward.
          cache_index: int32 [], the slot the (single) new token is written to; required with `cache`.
          collect: names of extra values to return (see `causal_attention` and `decode_attention`).

        Returns:
          The output [B, T, D]; (keys, values, decode state): the T new rotated keys/values [B, T, K, H] and the
          state `decode_state` builds from them without a cache, the updated buffers [B, S, K, H] and state with
          one; and the collected values by name.
        """
        batch, length, _ = hidden.shape
        q, k, v = self.project_qkv(hidden)  # pre-RoPE: [B, T, N, H], [B, T, K, H], [B, T, K, H]
        q_rot = apply_rope(q, positions, self.rope)
        k_rot = apply_rope(k, positions, self.rope)
        if cache is None:
            out, collected = self.causal_attention(q, k, v, q_rot, k_rot, key_mask=key_mask, collect=collect)
            kv = (k_rot, v, self.decode_state(k, k_rot, key_mask=key_mask))  # [B, T, K, H] each, and the state
        else:
            if length != 1:
                raise ValueError(f"decoding with a cache takes one token per step, got T={length}")
            start = (0, cache_index, 0, 0)
            k_cache = jax.lax.dynamic_update_slice(cache[0], k_rot.astype(cache[0].dtype), start)  # [B, S, K, H]
            v_cache = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), start)  # [B, S, K, H]
            out, state, collected = self.decode_attention(
                q, k, q_rot, k_rot, k_cache, v_cache, key_mask=key_mask, state=cache[2], collect=collect
            )
            kv = (k_cache, v_cache, state)
        out = self.o_proj(out.reshape(batch, length, self.num_q_heads * self.head_dim))  # [B, T, D]
        return out, kv, collected


# Tokens per MLP call above which the MLP runs over sequence chunks (`MLP.__call__`); a training step of 8 × 8192
# tokens stays one call.
MLP_TOKEN_CHUNK = 65536


class MLP(nnx.Module):
    """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x))."""

    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        hidden, inner = config.hidden_size, config.intermediate_size
        linear = dict(
            use_bias=config.mlp_bias,
            initializer_range=config.initializer_range,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.gate_proj = Linear(hidden, inner, sharding=("embed", "mlp"), **linear)
        self.up_proj = Linear(hidden, inner, sharding=("embed", "mlp"), **linear)
        self.down_proj = Linear(inner, hidden, sharding=("mlp", "embed"), **linear)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, D] → [B, T, D]. Calls of more than `MLP_TOKEN_CHUNK` tokens run over chunks of the sequence
        (`lax.map`), so that a long prompt's [B, T, intermediate] activations are never all live at once (a 128k
        prompt at batch 8 of Llama-3.1-8B would need ~60 GiB of them per layer). Each token's result is the same
        row-wise computation either way."""
        batch, length, hidden = x.shape
        chunk = max(MLP_TOKEN_CHUNK // batch, 1)
        if batch * length <= MLP_TOKEN_CHUNK or length <= chunk:
            return self._swiglu(x)
        num_chunks = -(-length // chunk)
        padded = jnp.pad(x, ((0, 0), (0, num_chunks * chunk - length), (0, 0)))
        chunks = padded.reshape(batch, num_chunks, chunk, hidden).swapaxes(0, 1)  # [n, B, chunk, D]
        out = jax.lax.map(self._swiglu, chunks).swapaxes(0, 1).reshape(batch, num_chunks * chunk, hidden)
        return out[:, :length]

    def _swiglu(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        attention_implementation: str,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        norm = dict(eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, **norm)
        self.self_attn = Attention(
            config, attention_implementation=attention_implementation, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.post_attention_layernorm = RMSNorm(config.hidden_size, **norm)
        self.mlp = MLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(
        self,
        hidden: jax.Array,
        positions: jax.Array,
        *,
        key_mask: jax.Array | None,
        cache: tuple[jax.Array, jax.Array, Any] | None = None,
        cache_index: jax.Array | None = None,
        collect: frozenset[str] = frozenset(),
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array, Any], dict[str, jax.Array]]:
        """hidden [B, T, D] → [B, T, D], plus the layer's (keys, values, decode state) and collected values;
        arguments as in `Attention.__call__`."""
        attention_out, kv, collected = self.self_attn(
            self.input_layernorm(hidden),
            positions,
            key_mask=key_mask,
            cache=cache,
            cache_index=cache_index,
            collect=collect,
        )
        hidden = hidden + attention_out
        hidden = hidden + self.mlp(self.post_attention_layernorm(hidden))
        return hidden, kv, collected


class DecoderStack(nnx.Module):
    """HF's `model`: token embedding, decoder layers, final norm."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        attention_implementation: str,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        self.embed_tokens = Embedding(
            config.vocab_size,
            config.hidden_size,
            initializer_range=config.initializer_range,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.layers = nnx.List(
            DecoderLayer(
                config,
                attention_implementation=attention_implementation,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
            for _ in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)


def _call_layer(
    layer: DecoderLayer,
    hidden: jax.Array,
    positions: jax.Array,
    key_mask: jax.Array | None,
    cache: tuple[jax.Array, jax.Array, Any] | None,
    cache_index: jax.Array | None,
    collect: frozenset[str],
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, Any], dict[str, jax.Array]]:
    return layer(hidden, positions, key_mask=key_mask, cache=cache, cache_index=cache_index, collect=collect)


_call_layer_remat = nnx.remat(_call_layer, static_argnums=(6,))


class CausalLM(nnx.Module):
    """Decoder-only LM: tokens → logits over the vocabulary.

    Args:
      config: the architecture.
      attention_implementation: `"xla"` (pure jnp; CPU and reference) or `"cudnn"` (GPU, bf16/fp16).
      dtype: compute dtype (activations, KV cache, logits). On GPUs, JAX runs float32 matmuls as TF32 unless
        `jax.default_matmul_precision("highest")` is in effect.
      param_dtype: dtype of the weights.
      rngs: random init; build with `nnx.eval_shape` to skip it when weights are loaded afterwards.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        attention_implementation: str = "xla",
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.model = DecoderStack(
            config, attention_implementation=attention_implementation, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Linear(
                config.hidden_size,
                config.vocab_size,
                use_bias=False,
                sharding=("embed", "vocab"),
                initializer_range=config.initializer_range,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
        )

    def unembed(self, hidden: jax.Array) -> jax.Array:
        """The last decoder layer's output [B, T, D] → final norm → `lm_head` (or the tied embedding) → [B, T, V]."""
        hidden = self.model.norm(hidden)
        if self.lm_head is None:
            return self.model.embed_tokens.attend(hidden)  # [B, T, V]
        return self.lm_head(hidden)  # [B, T, V]

    def __call__(
        self,
        tokens: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        remat: bool = False,
    ) -> tuple[jax.Array, KVCache]:
        """Logits for `tokens` and the keys/values they produced: `forward` without collected values."""
        logits, new_cache, _ = self.forward(
            tokens, attention_mask=attention_mask, positions=positions, cache=cache, last_only=last_only, remat=remat
        )
        return logits, new_cache

    def forward(
        self,
        tokens: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        remat: bool = False,
        collect: frozenset[str] | tuple[str, ...] = frozenset(),
    ) -> tuple[jax.Array, KVCache, tuple[Mapping[str, jax.Array], ...]]:
        """Logits for `tokens`, the keys/values they produced, and each layer's collected values.

        Args:
          tokens: int [B, T].
          attention_mask: bool [B, T], False on left padding; None when there is none (lets cuDNN skip masking).
          positions: int [B, T] RoPE positions; by default from `attention_mask` (and the cache when decoding).
          cache: None for a causal forward; a `KVCache` to decode one token (T = 1) at slot `cache.length`.
          last_only: compute logits for the last position only ([B, 1, V]).
          remat: rematerialise each decoder layer (`nnx.remat`): a backward pass recomputes the layer's activations
            instead of keeping them, so training memory holds one layer's activations plus the L layer inputs.
          collect: names of per-layer values to return besides the logits (a forward of a model whose attention
            layers produce them, e.g. `seer_jax.seer.SeerCausalLM`); empty for none.

        Returns:
          logits [B, T, V] (or [B, 1, V]) in the compute dtype; the new `KVCache`: the forward's T slots without a
          cache, the updated cache with one; and per layer a dict of the collected values (empty dicts when
          `collect` is empty). Under `jax.jit`, logits nobody uses are never computed.
        """
        collect = frozenset(collect)
        batch, length = tokens.shape
        if attention_mask is None:
            token_mask = jnp.ones((batch, length), bool)  # [B, T]
        else:
            token_mask = attention_mask.astype(bool)
        if cache is None:
            num_keys = length
            key_mask = None if attention_mask is None else token_mask  # [B, T]
            if positions is None:
                positions = positions_from_mask(token_mask)
        else:
            num_keys = cache.max_length
            key_mask = jax.lax.dynamic_update_slice(cache.key_mask, token_mask, (0, cache.length))  # [B, S]
            if positions is None:
                positions = cache.next_positions()[:, None] + positions_from_mask(token_mask)
        window = self.config.sliding_window
        if window is not None and num_keys > window:
            raise ValueError(
                f"attention over {num_keys} keys exceeds the model's sliding_window ({window}); sliding-window "
                "attention is not implemented: use at most sliding_window tokens (prompt + generated)"
            )

        hidden = self.model.embed_tokens(tokens)  # [B, T, D]
        call_layer = _call_layer_remat if remat else _call_layer
        keys, values, states, collected = [], [], [], []
        for index, layer in enumerate(self.model.layers):
            layer_cache = None if cache is None else (cache.keys[index], cache.values[index], cache.decode_state(index))
            cache_index = None if cache is None else cache.length
            hidden, (key, value, state), layer_collected = call_layer(
                layer, hidden, positions, key_mask, layer_cache, cache_index, collect
            )
            keys.append(key)
            values.append(value)
            states.append(state)
            collected.append(layer_collected)
        decode_states = tuple(states) if any(state is not None for state in states) else None
        logits = self.unembed(hidden[:, -1:] if last_only else hidden)  # [B, T, V] (or [B, 1, V])

        if cache is None:
            new_cache = KVCache(
                keys=tuple(keys),
                values=tuple(values),
                key_mask=token_mask,
                length=jnp.asarray(length, jnp.int32),
                decode_states=decode_states,
            )
        else:
            new_cache = KVCache(
                keys=tuple(keys),
                values=tuple(values),
                key_mask=key_mask,
                length=cache.length + length,
                decode_states=decode_states,
            )
        return logits, new_cache, tuple(collected)
