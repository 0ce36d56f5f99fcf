"""SeerAttention-R decode-gate distillation: the per-token target (the "1D" ground truth) and the gate's logits on
every token of a training forward (docs/design.md §5 "Decode gates", §8).

Rows are row-aligned, as `seer.RowLayout` leaves them: row b's real tokens at positions 0 … L_b − 1 (padding after
them), so t is the token's index in its own row. With blocks of `block_size` keys (J = ceil(T / block_size)),
G = N / K, H^-½ the attention's scale:

    s[b, n, t, c]   = q_rot[b, t, n] · k_rot[b, c, n // G] · H^-½                        for keys c ≤ t
    lse[b, n, t]    = log Σ_{c ≤ t} exp s[b, n, t, c]
    a[b, k, t, j]   = max over the G query heads n of kv head k and the keys c of block j of s[b, n, t, c] − lse
    target[b, k, t, j] = softmax over the completed earlier blocks j < t // block_size of a[b, k, t, j]
                         for block_size ≤ t < L_b; 0 for every other (t, j)

exp(a) is the official P1 (spec §4.3: the largest single-key attention probability of the group inside block j,
per query head, then the max over the group), so the target is the official ground truth: P1 with the token's own
block and later ones zeroed, renormalised per row. Normalising in log space is exact and never underflows; the
official `+1e-9` epsilon is gone (docs/design.md §8, deviation 10): a row t < block_size has no completed block and
is all zero, and the loss leaves it out (`train.losses.decode_gate_kl_loss`).

Memory: `lax.map` over chunks of `query_chunk` rows; a chunk holds its scores [B, K, G, chunk, S] in float32, so the
peak is O(B·N·chunk·S) next to the O(B·K·T·J) target, never [T, S] for all T. Each chunk scores all S keys (the
causal upper part too): a jnp reference and the CPU path, not a fast kernel.

The gate's side (`DecodeAttnGate`, spec §1.6 training branch): `DecodeFeatures` are the parameter-free inputs a
frozen forward collects per layer (pre-RoPE q and the pooled k blocks); `training_logits` scores every token against
every block, masked to the same completed earlier blocks, differentiable in the gate's weights only.
"""

import dataclasses

import jax
import jax.numpy as jnp

from seer_jax.decode_gate import DecodeAttnGate
from seer_jax.gate import MASKED_LOGIT, block_positions
from seer_jax.head_parallel import per_device_heads
from seer_jax.sharding import HEAD_AXIS

QUERY_CHUNK = 256  # rows per lax.map step: [B, N, 256, S] float32 scores, 256 MiB for B·N = 32 at S = 8192


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeFeatures:
    """The parameter-free inputs of a layer's decode gate on a training forward, row-aligned.

    Attributes:
      q: pre-RoPE queries [B, T, N, H] (the model's compute dtype); token t's gate query is rotated at t.
      k: the gate's pooled key blocks float32 [B, J, K, Ck] (`DecodeAttnGate.pool`; blocks past a row's end zero).
      lengths: int32 [B], the real tokens of each row.
      quest: None, or (decode gates distilled on the hybrid, `DecodeConfig.quest_weight` > 0) each token's
        group-max Quest bound f32 [B, K, T, J] (`decode_scores.quest_token_bounds`), which `training_logits` adds
        times the weight, so that the gate learns what the bound misses.
    """

    q: jax.Array
    k: jax.Array
    lengths: jax.Array
    quest: jax.Array | None = None


def completed_blocks(length: int, num_blocks: int, block_size: int) -> jax.Array:
    """bool [T, J]: block j is completed before token t (j < t // block_size), what token t may score."""
    return jnp.arange(num_blocks)[None, :] < (jnp.arange(length) // block_size)[:, None]


def decode_target(
    q: jax.Array,
    k: jax.Array,
    *,
    block_size: int,
    lengths: jax.Array | None = None,
    query_chunk: int = QUERY_CHUNK,
) -> jax.Array:
    """The decode gate's target (module docstring).

    Args:
      q: rotated queries [B, T, N, H], row-aligned.
      k: rotated keys [B, T, K, H], row-aligned.
      block_size: key positions per block.
      lengths: int [B], the real tokens of each row; None: all T.
      query_chunk: query rows scored per step.

    Returns:
      float32 [B, K, T, J]; each row t with block_size ≤ t < L_b sums to 1 over j < t // block_size.
    """
    batch, length, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    if k.shape != (batch, length, num_kv_heads, head_dim) or num_q_heads % num_kv_heads:
        raise ValueError(f"decode_target takes q [B, T, N, H] and k [B, T, K, H] (K | N), got {q.shape}, {k.shape}")
    group = num_q_heads // num_kv_heads
    num_blocks = -(-length // block_size)
    chunk = min(query_chunk, length)
    num_chunks = -(-length // chunk)
    lengths = jnp.full((batch,), length, jnp.int32) if lengths is None else lengths.astype(jnp.int32)  # [B]
    # Padded keys sit after every real row's queries (c > t), padded query rows are dropped at the end.
    keys = jnp.pad(k, ((0, 0), (0, num_blocks * block_size - length), (0, 0), (0, 0)))  # [B, S', K, H]
    queries = jnp.pad(q, ((0, 0), (0, num_chunks * chunk - length), (0, 0), (0, 0)))  # [B, T', N, H]
    queries = queries.reshape(batch, num_chunks, chunk, num_kv_heads, group, head_dim)
    queries = queries.transpose(1, 0, 2, 3, 4, 5)  # [chunks, B, chunk, K, G, H]
    key_positions = jnp.arange(num_blocks * block_size)  # [S']
    scale = head_dim**-0.5
    # float32 inputs: float32 products for real (on GPU XLA would use TF32); bf16 products are exact in float32.
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else jax.lax.Precision.DEFAULT

    def one_chunk(index_and_queries):
        index, chunk_queries = index_and_queries  # chunk_queries [B, chunk, K, G, H]
        rows = index * chunk + jnp.arange(chunk)  # [chunk]
        scores = jnp.einsum(
            "brkgh,bskh->bkgrs",
            chunk_queries,
            keys,
            precision=precision,
            preferred_element_type=jnp.float32,
        )  # [B, K, G, chunk, S']
        scores = jnp.where(key_positions <= rows[:, None], scores * scale, -jnp.inf)
        lse = jax.nn.logsumexp(scores, axis=-1)  # [B, K, G, chunk]; finite: key c = t is visible
        block_max = scores.reshape(*scores.shape[:-1], num_blocks, block_size).max(axis=-1)  # [B, K, G, chunk, J]
        log_p1 = jnp.max(block_max - lse[..., None], axis=2)  # [B, K, chunk, J]
        allowed = (jnp.arange(num_blocks)[None, :] < (rows // block_size)[:, None])[None] & (
            rows[None, :, None] < lengths[:, None, None]
        )  # [B, chunk, J]
        allowed = allowed[:, None]  # [B, 1, chunk, J]
        log_p1 = jnp.where(allowed, log_p1, -jnp.inf)
        row_max = jnp.max(log_p1, axis=-1, keepdims=True)  # [B, K, chunk, 1]
        weights = jnp.where(allowed, jnp.exp(log_p1 - jnp.where(allowed, row_max, 0.0)), 0.0)  # [B, K, chunk, J]
        total = jnp.sum(weights, axis=-1, keepdims=True)  # [B, K, chunk, 1]; 0 only for rows with no block
        return weights / jnp.where(total > 0, total, 1.0)

    target = jax.lax.map(one_chunk, (jnp.arange(num_chunks), queries))  # [chunks, B, K, chunk, J]
    target = target.transpose(1, 2, 0, 3, 4).reshape(batch, num_kv_heads, num_chunks * chunk, num_blocks)
    return target[:, :, :length]  # [B, K, T, J]


def decode_target_per_device(
    q: jax.Array, k: jax.Array, *, block_size: int, lengths: jax.Array | None = None
) -> jax.Array:
    """`decode_target` with each device on its rows and kv heads when a mesh is active (`seer_jax.head_parallel`).

    The max over a kv head's query heads needs them on one device: a mesh whose tensor axis does not divide the kv
    heads is refused.
    """
    mesh = jax.sharding.get_abstract_mesh()
    tensor = 1 if mesh.empty else dict(mesh.shape).get(HEAD_AXIS, 1)
    if k.shape[2] % tensor:
        raise ValueError(f"mesh: tensor={tensor} must divide the {k.shape[2]} kv heads for the decode-gate target")

    def target(q, k, lengths):
        return decode_target(q, k, block_size=block_size, lengths=lengths)

    return per_device_heads(target, [(q, "BTNH"), (k, "BSKH"), (lengths, "B")], "BKTJ")


def training_logits(gate: DecodeAttnGate, features: DecodeFeatures) -> jax.Array:
    """The gate's logits for every token of a training forward: float32 [B, K, T, J].

    Token t's gate query is rotated at t, block j's key at j · block_size (spec §1.5, training); logits of blocks
    that are not completed before t (j ≥ t // block_size) are MASKED_LOGIT, so a softmax over j spreads over the
    completed earlier blocks only (all-masked rows t < block_size are uniform: the loss leaves them out). With
    `features.quest` the logits are the hybrid's, gate + quest_weight × bound, as `decode_scores` ranks blocks.
    """
    batch, length = features.q.shape[:2]
    num_blocks = features.k.shape[1]
    block_size = gate.decode_config.block_size
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))  # [B, T]
    q_gate = gate.query(features.q, positions)  # [B, T, K, E]
    k_gate = gate.keys(features.k, block_positions(batch, num_blocks, block_size))  # [B, J, K, E]
    logits = jax.vmap(gate.scores, in_axes=(1, None), out_axes=2)(q_gate, k_gate)  # [B, K, T, J]
    if features.quest is not None:
        logits = logits + gate.decode_config.quest_weight * features.quest
    return jnp.where(completed_blocks(length, num_blocks, block_size), logits, MASKED_LOGIT)
