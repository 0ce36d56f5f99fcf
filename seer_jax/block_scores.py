"""Where block scores come from: one registry, `SOURCES`, of the learned gate, the oracle and training-free baselines.

Every source returns float32 scores [B, N, I, J] where larger means more important, exactly like gate logits, so
`seer_jax.sparsity.select_blocks` turns any of them into a block mask. At the same `nz_ratio` every source keeps
the same number of blocks per row (plus the forced diagonal), so densities match by construction and evaluations
compare what is selected, not how much. A source is called with one layer's `ScoreInputs`.

- `gate`: the layer's learned AttnGate on the pre-RoPE q/k (`seer_jax.gate`); with `quest_weight` w > 0
  (`SeerConfig.quest_weight`), plus w × `quest_scores`.

- `oracle_scores`: the true 2D max-pooled attention map of the layer (`attention_with_pooling`, the gate's
  distillation target), as log-probabilities: TopK keeps the blocks with the largest pooled attention, and
  `threshold` (a softmax over the row) thresholds the pooled map itself.
- `quest_scores` (MoBA / Quest-style): mean-pooled post-RoPE q of block i · mean-pooled post-RoPE k of block j,
  per query head (its kv head's k), scaled by H^-0.5 like attention logits.
- `streaming_scores` (StreamingLLM): the first block (the attention sink) above everything, then the most recent
  blocks: TopK with k blocks per row keeps block 0 and the k − 1 blocks ending at the diagonal.
- `random_scores`: uniform random scores from a key.

`streaming` and `random` are rankings, not logits (`RANKING_SOURCES`): use them with `nz_ratio` selection only.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from seer_jax.gate import AttnGate, pool_blocks
from seer_jax.head_parallel import attention_with_pooling_per_device


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScoreInputs:
    """One layer's inputs to a block-score source, every row moved to start at its first real token.

    Attributes:
      q, k: pre-RoPE queries [B, T, N, H] and keys [B, T, K, H] (what the gate sees).
      q_rot, k_rot, v: rotated queries and keys, and values [B, T, K, H] (what attention sees).
      lengths: int [B] real tokens per row, or None when every position is real.
      gate: the layer's AttnGate.
      key: the layer's `jax.random.key` (the "random" source).
      quest_weight: the weight of `quest_scores` added to the gate's logits ("gate" only; `SeerConfig.quest_weight`).
    """

    q: jax.Array
    k: jax.Array
    q_rot: jax.Array
    k_rot: jax.Array
    v: jax.Array
    lengths: jax.Array | None
    gate: AttnGate
    key: jax.Array
    quest_weight: float = 0.0

    @property
    def block_size(self) -> int:
        return self.gate.gate_config.block_size

    @property
    def score_shape(self) -> tuple[int, int, int, int]:
        """[B, N, I, J] of this layer's scores."""
        batch, length, num_q_heads = self.q.shape[:3]
        num_blocks = -(-length // self.block_size)
        return (batch, num_q_heads, num_blocks, num_blocks)


def oracle_scores(q: jax.Array, k: jax.Array, v: jax.Array, *, block_size: int) -> jax.Array:
    """Post-RoPE q [B, T, N, H], k/v [B, T, K, H] → log of the row-normalised pooled attention, f32 [B, N, I, J].

    Zero probabilities (above the diagonal) become log of the smallest normal float32, so scores stay finite.
    """
    _, pooled = attention_with_pooling_per_device(q, k, v, block_size=block_size)  # [B, N, I, J], rows sum to 1
    return jnp.log(jnp.maximum(pooled, jnp.finfo(jnp.float32).tiny))


def quest_scores(q: jax.Array, k: jax.Array, *, block_size: int, lengths: jax.Array | None = None) -> jax.Array:
    """Post-RoPE q [B, T, N, H], k [B, T, K, H] → mean(q of block i) · mean(k of block j) · H^-0.5, f32 [B, N, I, J].

    lengths: int [B], valid positions per row (all T when None); later positions are left out of the means.
    """
    batch, _, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    q_mean = pool_blocks(q, ("avg",), block_size=block_size, lengths=lengths)  # [B, I, N, H]
    k_mean = pool_blocks(k, ("avg",), block_size=block_size, lengths=lengths)  # [B, J, K, H]
    num_blocks = q_mean.shape[1]
    grouped = q_mean.reshape(batch, num_blocks, num_kv_heads, num_q_heads // num_kv_heads, head_dim)  # [B, I, K, G, H]
    scores = jnp.einsum("bikgh,bjkh->bkgij", grouped, k_mean) * head_dim**-0.5  # [B, K, G, I, J]
    return scores.reshape(batch, num_q_heads, num_blocks, num_blocks)  # [B, N, I, J]


def streaming_scores(shape: tuple[int, int, int, int]) -> jax.Array:
    """f32 scores of `shape` [B, N, I, J]: J for key block 0 (the sink), j for every other key block j."""
    num_kv_blocks = shape[-1]
    columns = jnp.arange(num_kv_blocks, dtype=jnp.float32)  # [J]
    return jnp.broadcast_to(jnp.where(columns == 0, float(num_kv_blocks), columns), shape)  # [B, N, I, J]


def random_scores(key: jax.Array, shape: tuple[int, int, int, int]) -> jax.Array:
    """f32 scores of `shape` [B, N, I, J], uniform in [0, 1) and independent, from a `jax.random.key`."""
    return jax.random.uniform(key, shape, jnp.float32)


def _quest(inputs: ScoreInputs) -> jax.Array:
    return quest_scores(inputs.q_rot, inputs.k_rot, block_size=inputs.block_size, lengths=inputs.lengths)


def _gate(inputs: ScoreInputs) -> jax.Array:
    logits = inputs.gate(inputs.q, inputs.k, lengths=inputs.lengths)  # [B, N, I, J]
    return logits + inputs.quest_weight * _quest(inputs) if inputs.quest_weight > 0 else logits


ScoreSource = Callable[[ScoreInputs], jax.Array]
SOURCES: dict[str, ScoreSource] = {
    "gate": _gate,
    "oracle": lambda inputs: oracle_scores(inputs.q_rot, inputs.k_rot, inputs.v, block_size=inputs.block_size),
    "quest": _quest,
    "streaming": lambda inputs: streaming_scores(inputs.score_shape),
    "random": lambda inputs: random_scores(inputs.key, inputs.score_shape),
}
RANKING_SOURCES = ("streaming", "random")  # scores that are rankings, not logits: TopK selection only
