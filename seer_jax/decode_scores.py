"""Where decode block scores come from: one registry, `DECODE_SOURCES`, of the decode gate, the oracle and
training-free baselines; the decode-step counterpart of `seer_jax.block_scores` (docs/design.md §8).

A source is called once per decode step and sparse layer with that layer's `DecodeScoreInputs` and returns float32
scores, larger meaning more important, in each row's own block coordinates (`seer_jax.k_compression`: block j of a
row holds its real tokens j·block_size … (j+1)·block_size − 1, whatever the batch's left padding):
    [B, K, J]  one selection per kv head, shared by its G query heads (gate, oracle, streaming, random), or
    [B, N, J]  one per query head (quest, its native setting: no GQA sharing).
`seer_jax.decode_selection.select_decode_blocks` then applies the same rules to every source (token budget, context
fraction or threshold; the current block always, the sink, the window), so at one budget every source attends the
same number of blocks per (row, head) and evaluations compare what is selected, not how much. Blocks at or past the
current one get scores too, which selection ignores (only completed earlier blocks are ranked).

- `gate`: the layer's decode gate, its query against the compressed keys (`seer_jax.decode_gate`,
  `seer_jax.k_compression`); the decoded token's key is appended first. With `DecodeConfig.quest_weight` w > 0, plus
  w × Quest's bound (below), max over the kv head's G query heads, from the block key bounds the compressed cache
  keeps (the same values Quest recomputes from the KV cache).
- `oracle_decode_scores` (SEER_R_SPEC §3.8): exact attention from the post-RoPE q and the KV cache: per kv head,
  the max over its G query heads of the max over the block of softmax(q·k/√H) over the row's real keys (the decoded
  token's included), as a log-probability (finite: empty blocks get log of the smallest normal float32). TopK ranks
  by it; `threshold` thresholds the softmax over blocks of these logs, i.e. the block maxima normalised over the
  scored blocks (the official oracle thresholds the raw maxima).
- `quest_decode_scores` (Quest, arXiv 2406.10774; SEER_R_SPEC §6.1): per query head, the channel-wise upper bound
  Σ_h max(q_h · max_h, q_h · min_h) · H^-½ of q·k/√H over a block, max/min taken per channel over the block's real
  post-RoPE keys in the cache (recomputed from the cache each step; Quest keeps them incrementally, same values).
- `streaming_decode_scores` (StreamingLLM): block 0 (the attention sink) above everything, then the most recent
  blocks: a budget of k blocks keeps the sink and the k − 1 blocks before the current one (which is forced anyway).
- `random_decode_scores`: uniform random scores, drawn from the layer's key folded with the decoded token's
  position, so every step and layer draws afresh and a left-padded row draws exactly what it draws alone.

`streaming` and `random` are rankings, not logits (`decode_config.RANKING_DECODE_SOURCES`): budgets only.
The cache must hold each row's real tokens in consecutive slots (left padding, then its tokens), as a `KVCache` does.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from seer_jax.decode_gate import DecodeAttnGate
from seer_jax.k_compression import KCompressionCache, block_key_bounds


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeScoreInputs:
    """One layer's inputs to a decode score source at one decode step.

    Attributes:
      q: the decoded token's pre-RoPE query [B, 1, N, H] (what the decode gate sees).
      q_rot: the same query after RoPE (what attention sees).
      k_cache: the rotated keys [B, S, K, H], the decoded token's key already written.
      key_mask: bool [B, S], the cache's real slots (the decoded token's included).
      gate: the layer's decode gate.
      state: the layer's compressed keys with the decoded token appended, and their key bounds with quest_weight > 0
        ("gate" only; None for the others).
      key: the layer's `jax.random.key` (the "random" source).
    """

    q: jax.Array
    q_rot: jax.Array
    k_cache: jax.Array
    key_mask: jax.Array
    gate: DecodeAttnGate
    state: KCompressionCache | None
    key: jax.Array

    @property
    def block_size(self) -> int:
        return self.gate.decode_config.block_size

    @property
    def lengths(self) -> jax.Array:
        """int32 [B]: the real tokens of each row, the decoded one included."""
        return jnp.sum(self.key_mask, axis=-1, dtype=jnp.int32)

    @property
    def kv_score_shape(self) -> tuple[int, int, int]:
        """[B, K, J] of a per-kv-head source, J = ceil(S / block_size) (the compressed cache's block slots)."""
        batch, num_slots, num_kv_heads = self.k_cache.shape[:3]
        return (batch, num_kv_heads, -(-num_slots // self.block_size))


def row_blocks(x: jax.Array, key_mask: jax.Array, block_size: int) -> tuple[jax.Array, jax.Array]:
    """Cache slots [B, S, ...] → each row's own blocks [B, J, block_size, ...] and which entries are real tokens
    bool [B, J, block_size], J = ceil(S / block_size).

    Row b's real slots (consecutive, starting at its first real slot) are moved to positions 0 … lengths[b] − 1;
    the other entries are arbitrary (other slots' values or zeros) and flagged False.
    """
    batch, num_slots = key_mask.shape
    num_blocks = -(-num_slots // block_size)
    first = jnp.argmax(key_mask, axis=-1)  # [B]: the row's left padding
    source = (jnp.arange(num_slots)[None, :] + first[:, None]) % num_slots  # [B, S]
    aligned = jnp.take_along_axis(x, source.reshape(batch, num_slots, *([1] * (x.ndim - 2))), axis=1)  # [B, S, ...]
    valid = jnp.arange(num_slots)[None, :] < jnp.sum(key_mask, axis=-1)[:, None]  # [B, S]
    extra = num_blocks * block_size - num_slots
    aligned = jnp.pad(aligned, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2))  # [B, J·block_size, ...]
    valid = jnp.pad(valid, [(0, 0), (0, extra)])  # [B, J·block_size]
    blocks = aligned.reshape(batch, num_blocks, block_size, *x.shape[2:])  # [B, J, block_size, ...]
    return blocks, valid.reshape(batch, num_blocks, block_size)


def oracle_decode_scores(q: jax.Array, k_cache: jax.Array, key_mask: jax.Array, *, block_size: int) -> jax.Array:
    """Post-RoPE q [B, N, H] of the decoded token, rotated keys [B, S, K, H] and the real slots bool [B, S] →
    f32 [B, K, J]: log of max over the kv head's G query heads of max over block j of softmax(q·k/√H) over the
    row's real keys (module docstring)."""
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    grouped = q.reshape(batch, num_kv_heads, num_q_heads // num_kv_heads, head_dim).astype(k_cache.dtype)
    logits = jnp.einsum("bkgh,bskh->bskg", grouped, k_cache, preferred_element_type=jnp.float32)  # [B, S, K, G]
    logits = logits * head_dim**-0.5
    logits = jnp.where(key_mask[:, :, None, None], logits, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=1)  # [B, K, G]: over the real keys
    blocks, valid = row_blocks(logits, key_mask, block_size)  # [B, J, block_size, K, G], [B, J, block_size]
    block_max = jnp.max(jnp.where(valid[..., None, None], blocks, -jnp.inf), axis=2)  # [B, J, K, G]
    log_prob = jnp.max(block_max - lse[:, None], axis=-1)  # [B, J, K]
    log_prob = jnp.maximum(log_prob, jnp.log(jnp.finfo(jnp.float32).tiny))  # empty blocks: finite
    return log_prob.transpose(0, 2, 1)  # [B, K, J]


def quest_bound(q: jax.Array, key_bounds: jax.Array) -> jax.Array:
    """Post-RoPE q [B, N, H] and each block's channel max and min of its kv head's keys [B, K, J, 2, H] → f32
    [B, N, J], Σ_h max(q_h·max_h, q_h·min_h) · H^-½ (Quest's upper bound on q·k/√H over the block), computed as
    q⁺·max + q⁻·min with q⁺ = max(q, 0), q⁻ = min(q, 0): one matmul over (max, min) × H, no [B, J, N, H] product.

    In the bounds' dtype with float32 accumulation: q is cast to it (the KV cache's dtype, which attention reads q
    in too), so every product is exact in float32, as a float32 matmul of the same values would give."""
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = key_bounds.shape[1]
    grouped = q.astype(key_bounds.dtype).reshape(batch, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
    zero = jnp.zeros((), grouped.dtype)
    signed = jnp.stack([jnp.maximum(grouped, zero), jnp.minimum(grouped, zero)], axis=3)  # [B, K, G, 2, H]
    exact = jax.lax.Precision.HIGHEST  # float32 bounds: float32 products, not TF32
    scores = jnp.einsum(
        "bkgch,bkjch->bkgj", signed, key_bounds, precision=exact, preferred_element_type=jnp.float32
    )  # [B, K, G, J]
    return scores.reshape(batch, num_q_heads, -1) * head_dim**-0.5  # [B, N, J]


def quest_token_bounds(q_rot: jax.Array, key_bounds: jax.Array) -> jax.Array:
    """Every token's group-max Quest bound, as the hybrid decode source adds it (`_gate_scores`): post-RoPE q
    [B, T, N, H] and row-aligned block bounds [B, K, J, 2, H] (`k_compression.block_key_bounds`) → f32 [B, K, T, J],
    the max over each kv head's query heads of `quest_bound` of token t against block j (the caller masks the blocks
    a token may not score). Parameter-free: a training input of decode gates distilled on the hybrid."""
    bounds = jax.vmap(quest_bound, in_axes=(1, None), out_axes=2)(q_rot, key_bounds)  # [B, N, T, J]
    batch, _, length, num_blocks = bounds.shape
    return jnp.max(bounds.reshape(batch, key_bounds.shape[1], -1, length, num_blocks), axis=2)  # [B, K, T, J]


def quest_decode_scores(q: jax.Array, k_cache: jax.Array, key_mask: jax.Array, *, block_size: int) -> jax.Array:
    """Post-RoPE q [B, N, H] of the decoded token, rotated keys [B, S, K, H] and the real slots bool [B, S] →
    f32 [B, N, J]: per query head, `quest_bound` over block j's real keys of its kv head (module docstring); 0 for
    a block without real keys."""
    blocks, _ = row_blocks(k_cache.astype(jnp.float32), key_mask, block_size)  # [B, J, block_size, K, H]
    aligned = blocks.reshape(blocks.shape[0], -1, *blocks.shape[3:])  # [B, J·block_size, K, H], real tokens first
    lengths = jnp.sum(key_mask, axis=-1)  # [B]
    return quest_bound(q.astype(jnp.float32), block_key_bounds(aligned, lengths, block_size))


def streaming_decode_scores(shape: tuple[int, int, int]) -> jax.Array:
    """f32 scores of `shape` [B, K, J]: J for block 0 (the sink), j for every other block j."""
    num_blocks = shape[-1]
    columns = jnp.arange(num_blocks, dtype=jnp.float32)  # [J]
    return jnp.broadcast_to(jnp.where(columns == 0, float(num_blocks), columns), shape)  # [B, K, J]


def random_decode_scores(key: jax.Array, positions: jax.Array, shape: tuple[int, int, int]) -> jax.Array:
    """f32 scores of `shape` [B, K, J], uniform in [0, 1): row b's from `key` folded with positions[b] (int [B], the
    decoded token's position among the row's real tokens)."""
    per_row = shape[1:]
    return jax.vmap(lambda position: jax.random.uniform(jax.random.fold_in(key, position), per_row))(positions)


def _gate_scores(inputs: DecodeScoreInputs) -> jax.Array:
    position = inputs.lengths - 1  # [B] the decoded token's RoPE position
    q_gate = inputs.gate.query(inputs.q, position[:, None])[:, 0]  # [B, K, E]
    scores = inputs.gate.scores(q_gate, inputs.state.blocks)  # [B, K, J]
    weight = inputs.gate.decode_config.quest_weight
    if weight > 0:  # plus Quest's bound from the kept key bounds, max over each kv head's query heads
        bound = quest_bound(inputs.q_rot[:, 0], inputs.state.key_bounds)  # [B, N, J]
        batch, num_kv_heads, num_blocks = scores.shape
        bound = jnp.max(bound.reshape(batch, num_kv_heads, -1, num_blocks), axis=2)  # [B, K, J]
        scores = scores + weight * bound
    return scores


DecodeScoreSource = Callable[[DecodeScoreInputs], jax.Array]
# Keyed by `decode_config.DECODE_SOURCE_NAMES`, in that order.
DECODE_SOURCES: dict[str, DecodeScoreSource] = {
    "gate": _gate_scores,
    "oracle": lambda inputs: oracle_decode_scores(
        inputs.q_rot[:, 0], inputs.k_cache, inputs.key_mask, block_size=inputs.block_size
    ),
    "quest": lambda inputs: quest_decode_scores(
        inputs.q_rot[:, 0], inputs.k_cache, inputs.key_mask, block_size=inputs.block_size
    ),
    "streaming": lambda inputs: streaming_decode_scores(inputs.kv_score_shape),
    "random": lambda inputs: random_decode_scores(inputs.key, inputs.lengths - 1, inputs.kv_score_shape),
}
