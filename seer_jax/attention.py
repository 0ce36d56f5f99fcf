"""Dense grouped-query attention: the attention math of the model, behind one implementation switch.

`dot_product_attention(q, k, v, *, causal, key_mask, implementation)` takes q [B, T, N, H] and k/v [B, S, K, H]
(K divides N; query head n reads kv head n // G) and returns [B, T, N, H]. Softmax scale is H^-0.5.

- `"xla"`: pure jnp, the reference and the CPU path. Logits and softmax in float32; masked logits are set to the
  float32 minimum rather than -inf, so a query whose keys are all masked (a left-padding row) gets a uniform,
  finite average instead of NaN.
- `"cudnn"`: `jax.nn.dot_product_attention(..., implementation="cudnn")`, cuDNN's fused flash attention on NVIDIA
  GPUs (bf16/fp16 only). Without padding no `mask=` is passed, because jax turns any mask into a dense [B, 1, T, S]
  bias; causal masking uses `is_causal`. Fully masked (padding) query rows come out finite but differ from "xla".
  Checked on an H200 with jax 0.11.2 (GQA, head_dim 32 and 128, left padding, one-token decode).

`causal=True` requires T == S (self-attention over one sequence: query t sees keys 0..t). Decoding one token over a
cache uses `causal=False` with a `key_mask` that marks the filled cache slots.
"""

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn")


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    key_mask: jax.Array | None = None,
    implementation: str = "xla",
) -> jax.Array:
    """Softmax(q k^T / sqrt(H)) v with grouped kv heads; q [B, T, N, H], k/v [B, S, K, H] → [B, T, N, H].

    Args:
      q, k, v: queries, keys and values (keys already rotated).
      causal: query t attends keys s <= t only; requires T == S.
      key_mask: bool [B, S], False for keys never attended (padding, empty cache slots); None: all keys valid.
      implementation: one of `IMPLEMENTATIONS`.
    """
    batch, num_queries, num_q_heads, head_dim = q.shape
    num_keys, num_kv_heads = k.shape[1], k.shape[2]
    if k.shape != (batch, num_keys, num_kv_heads, head_dim) or v.shape != k.shape:
        raise ValueError(
            f"k and v must be [B, S, K, H] matching q [B, T, N, H]; got q {q.shape}, k {k.shape}, v {v.shape}"
        )
    if num_q_heads % num_kv_heads:
        raise ValueError(f"kv heads ({num_kv_heads}) must divide query heads ({num_q_heads})")
    if causal and num_queries != num_keys:
        raise ValueError(f"causal attention needs as many queries as keys, got T={num_queries}, S={num_keys}")
    if key_mask is not None and key_mask.shape != (batch, num_keys):
        raise ValueError(f"key_mask must be [B, S] = {(batch, num_keys)}, got {key_mask.shape}")
    if implementation == "xla":
        return _xla_attention(q, k, v, causal=causal, key_mask=key_mask)
    if implementation == "cudnn":
        # cuDNN takes the mask as a bias of full query length: [B, 1, 1, S] is rejected, [B, 1, T, S] works.
        mask = None
        if key_mask is not None:
            mask = jnp.broadcast_to(key_mask[:, None, None, :], (batch, 1, num_queries, num_keys))  # [B, 1, T, S]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="cudnn")
    raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}")


def _xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, key_mask: jax.Array | None) -> jax.Array:
    batch, num_queries, num_q_heads, head_dim = q.shape
    num_keys, num_kv_heads = k.shape[1], k.shape[2]
    grouped = q.reshape(batch, num_queries, num_kv_heads, num_q_heads // num_kv_heads, head_dim)  # [B, T, K, G, H]
    logits = jnp.einsum("btkgh,bskh->bkgts", grouped, k, preferred_element_type=jnp.float32)  # [B, K, G, T, S]
    logits = logits * (head_dim**-0.5)
    allowed = jnp.ones((batch, 1, 1, num_queries, num_keys), bool)  # [B, 1, 1, T, S]
    if causal:
        allowed = allowed & jnp.tril(jnp.ones((num_queries, num_keys), bool))
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, None, :]
    logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # [B, K, G, T, S]
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=jnp.float32)  # [B, T, K, G, H]
    return out.reshape(batch, num_queries, num_q_heads, head_dim).astype(q.dtype)  # [B, T, N, H]
