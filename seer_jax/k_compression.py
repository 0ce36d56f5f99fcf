"""`KCompressionCache`: a layer's decode-gate keys, one per completed key block, kept beside the KV cache.

Blocks are counted in each row's own coordinates, as the prefill side counts them (`seer.RowLayout`): block j of
row b holds its real tokens j·block_size … (j+1)·block_size − 1, whatever the left padding of the batch. A block's
gate key is final: pooled pre-RoPE k (the decode gate's k ops) → attngate_linear_k → knorm → RoPE at the block's
first position j·block_size (`DecodeAttnGate.keys`).

    prefill (`compress_prompt`):  every complete block of the prompt compressed at once; the open block's raw
                                  pre-RoPE keys go to `remainder`, slots 0 … n % block_size − 1.
    decode step (`append_token`): the new token's pre-RoPE key goes to remainder slot n % block_size (n its index
                                  in the row); when it completes block n // block_size, exactly that block's
                                  block_size raw keys are pooled into `blocks` and the remainder is cleared.

Why a raw-key remainder rather than re-reading the KV cache: the KV cache holds rotated keys, rounded to the compute
dtype after rotation; un-rotating them would give the gate keys that differ from the ones the prefill pooled (and
from training's), and a YaRN attention factor would have to be divided out. The remainder makes a block completed by
decoding bit-for-bit the pooling of the same pre-RoPE keys as a prompt block, for block_size · K · H values per row.

Memory per layer, for a cache of S positions (J = ceil(S / block_size) block slots), in the compute dtype
(`itemsize` bytes, 2 for bf16):
    blocks     J · K · E · itemsize           = K · E · itemsize / block_size bytes per token
    remainder  block_size · K · H · itemsize  fixed per row (one open block)
against 2 · K · H · itemsize bytes per token for the KV cache: a ratio of E / (2 · H · block_size), 1/128 for the
released gates (E = H = 128, block_size 64). Qwen3-8B (K = 8, bf16): 32 bytes per token per layer (the KV cache
4096), plus 128 KiB of remainder per row per layer.

Key bounds (`DecodeConfig.quest_weight` > 0 with the "gate" source, design §8): the cache also keeps, per block
and kv head, the channel-wise max and min of the block's real rotated keys (the KV cache's values, in its dtype), for
the Quest bound the gate's scores add (`seer_jax.decode_scores.quest_bound`): filled at prefill from the prompt's
rotated keys (the open block's too), extended at every decode step (a block's first token resets its slot). They
equal what Quest recomputes from the KV cache. Max and min sit in one array, so a step updates one slot and scores
every block with one matmul. The open block's bounds are also kept on their own (`open_bounds`, K · 2 · H values
per row), so that a step writes its block's slot without reading the array: a scatter whose update read the array
it wrote made XLA copy the whole array twice per layer and step (on the H200, 128k, batch 8: 17.5% of decode
tokens/s). They take 2 · K · H · itemsize / block_size bytes per token, read every step: 1/64
of the KV cache's bytes at block_size 64 (64 bytes per token per layer for K = 8, H = 128, bf16, against 4096).

Fixed capacity and static shapes: `padded_to` grows the block slots with the KV cache; unused slots are zeros.
"""

import dataclasses

import jax
import jax.numpy as jnp

from seer_jax.decode_gate import DecodeAttnGate
from seer_jax.gate import block_positions


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KCompressionCache:
    """One layer's compressed keys (module docstring).

    Attributes:
      blocks: [B, J, K, E] gate keys of each row's completed blocks, in its own block coordinates; zeros in the
        slots of blocks not yet completed.
      remainder: [B, block_size, K, H] pre-RoPE keys of each row's open block, token n at slot n % block_size;
        zeros in the slots past the open block's tokens.
      key_bounds: [B, K, J, 2, H] the channel-wise max (index 0) and min (index 1) of each block's real rotated
        keys (completed blocks and the open one), zeros for blocks without tokens; None when the gate adds no Quest
        bound. Kv-head-major, so that the bound's matmul (batched over rows and kv heads) reads it in place.
      open_bounds: [B, K, 2, H] key_bounds' slot of the block holding each row's last token, kept on its own: what
        the next token extends, unless it starts a new block; zeros for a row without tokens; None with key_bounds.
    """

    blocks: jax.Array
    remainder: jax.Array
    key_bounds: jax.Array | None = None
    open_bounds: jax.Array | None = None

    @property
    def block_size(self) -> int:
        return self.remainder.shape[1]

    def padded_to(self, max_length: int) -> "KCompressionCache":
        """The same cache with block slots for a KV cache of `max_length` positions (ceil(max_length / block_size))."""
        extra = -(-max_length // self.block_size) - self.blocks.shape[1]
        if extra < 0:
            raise ValueError(f"cannot shrink {self.blocks.shape[1]} compressed blocks to max_length={max_length}")
        blocks = jnp.pad(self.blocks, [(0, 0), (0, extra), (0, 0), (0, 0)])  # [B, J', K, E]
        key_bounds = self.key_bounds
        if key_bounds is not None:
            key_bounds = jnp.pad(key_bounds, [(0, 0), (0, 0), (0, extra), (0, 0), (0, 0)])  # [B, K, J', 2, H]
        return dataclasses.replace(self, blocks=blocks, key_bounds=key_bounds)


def block_key_bounds(k_rot: jax.Array, lengths: jax.Array, block_size: int) -> jax.Array:
    """Row-aligned rotated keys [B, T, K, H] (each row's real tokens first) and their count int [B] → the channel
    max and min over each block's real keys [B, K, J, 2, H] (J = ceil(T / block_size)), in k_rot's dtype; zeros
    for a block without real keys."""
    batch, length = k_rot.shape[:2]
    num_blocks = -(-length // block_size)
    padded = jnp.pad(k_rot, [(0, 0), (0, num_blocks * block_size - length), (0, 0), (0, 0)])
    blocks = padded.reshape(batch, num_blocks, block_size, *k_rot.shape[2:])  # [B, J, block_size, K, H]
    real = jnp.arange(num_blocks * block_size).reshape(num_blocks, block_size)[None] < lengths[:, None, None]
    real = real[..., None, None]  # [B, J, block_size, 1, 1]
    occupied = jnp.any(real, axis=2)  # [B, J, 1, 1]
    key_max = jnp.where(occupied, jnp.max(jnp.where(real, blocks, -jnp.inf), axis=2), 0)  # [B, J, K, H]
    key_min = jnp.where(occupied, jnp.min(jnp.where(real, blocks, jnp.inf), axis=2), 0)  # [B, J, K, H]
    return jnp.stack([key_max, key_min], axis=3).transpose(0, 2, 1, 3, 4).astype(k_rot.dtype)  # [B, K, J, 2, H]


def compress_prompt(
    gate: DecodeAttnGate, k: jax.Array, lengths: jax.Array, k_rot: jax.Array | None = None
) -> KCompressionCache:
    """The compressed keys of a prompt.

    Args:
      gate: the layer's decode gate.
      k: pre-RoPE keys [B, T, K, H], each row's real tokens first (row-aligned: `seer.RowLayout.align`).
      lengths: int [B], the real tokens of each row.
      k_rot: the same keys after RoPE, in the KV cache's dtype, aligned alike; needed for the key bounds
        (`DecodeConfig.keeps_key_bounds`), ignored otherwise.

    Returns:
      A cache with ceil(T / block_size) block slots: blocks 0 … lengths // block_size − 1 filled.
    """
    batch, length = k.shape[:2]
    block_size = gate.decode_config.block_size
    num_blocks = -(-length // block_size)
    pooled = gate.pool(k, lengths=lengths)  # [B, J, K, Ck]
    keys = gate.keys(pooled, block_positions(batch, num_blocks, block_size))  # [B, J, K, E]
    complete = lengths // block_size  # [B]
    done = (jnp.arange(num_blocks)[None, :] < complete[:, None])[:, :, None, None]  # [B, J, 1, 1]
    blocks = jnp.where(done, keys, 0.0).astype(k.dtype)  # [B, J, K, E]
    padded = jnp.pad(k, [(0, 0), (0, block_size), (0, 0), (0, 0)])  # [B, T + block_size, K, H]
    slots = jnp.arange(block_size)  # [block_size]
    source = complete[:, None] * block_size + slots[None, :]  # [B, block_size]
    remainder = jnp.take_along_axis(padded, source[:, :, None, None], axis=1)  # [B, block_size, K, H]
    is_open = (slots[None, :] < (lengths - complete * block_size)[:, None])[:, :, None, None]  # [B, block_size, 1, 1]
    remainder = jnp.where(is_open, remainder, 0).astype(k.dtype)
    if not gate.decode_config.keeps_key_bounds:
        return KCompressionCache(blocks=blocks, remainder=remainder)
    if k_rot is None:
        raise ValueError("the decode config keeps key bounds (quest_weight > 0): pass the rotated keys k_rot")
    key_bounds = block_key_bounds(k_rot, lengths, block_size)  # [B, K, J, 2, H]
    last = (jnp.maximum(lengths, 1) - 1) // block_size  # [B] the block of each row's last token
    open_bounds = jnp.take_along_axis(key_bounds, last[:, None, None, None, None], axis=2)[:, :, 0]  # [B, K, 2, H]
    open_bounds = jnp.where((lengths > 0)[:, None, None, None], open_bounds, 0).astype(key_bounds.dtype)
    return KCompressionCache(blocks=blocks, remainder=remainder, key_bounds=key_bounds, open_bounds=open_bounds)


def append_token(
    cache: KCompressionCache, gate: DecodeAttnGate, k: jax.Array, index: jax.Array, k_rot: jax.Array | None = None
) -> KCompressionCache:
    """Adds one decoded token per row.

    Args:
      cache: the layer's compressed keys before the token.
      gate: the layer's decode gate.
      k: the token's pre-RoPE key [B, 1, K, H].
      index: int [B], the token's index among the row's real tokens (its RoPE position).
      k_rot: the token's rotated key [B, 1, K, H]; needed when the cache keeps key bounds, ignored otherwise.

    Returns:
      The cache with the token in the remainder, or, when it completes its block, that block compressed.
    """
    num_blocks = cache.blocks.shape[1]
    block_size = cache.block_size
    slot = index % block_size  # [B]
    at_slot = (jnp.arange(block_size)[None, :] == slot[:, None])[:, :, None, None]  # [B, block_size, 1, 1]
    remainder = jnp.where(at_slot, k.astype(cache.remainder.dtype), cache.remainder)  # [B, block_size, K, H]
    block = index // block_size  # [B]
    completes = slot == block_size - 1  # [B]
    position = index if gate.decode_config.rope_at_block_end else block * block_size  # [B]
    key = gate.keys(gate.pool(remainder), position[:, None])  # [B, 1, K, E]
    # One block slot per completing row, written in place (a scatter: a where over all J slots would rewrite the
    # whole [B, J, K, E] cache every step); other rows aim past the last slot and are dropped.
    target = jnp.where(completes, block, num_blocks)  # [B]
    rows = jnp.arange(key.shape[0])
    blocks = cache.blocks.at[rows, target].set(key[:, 0].astype(cache.blocks.dtype), mode="drop")  # [B, J, K, E]
    remainder = jnp.where(completes[:, None, None, None], 0, remainder).astype(cache.remainder.dtype)
    key_bounds = cache.key_bounds
    if key_bounds is not None:
        if k_rot is None:
            raise ValueError("this cache keeps key bounds (quest_weight > 0): pass the token's rotated key k_rot")
        # The open block's bounds extended by the token (its first token starts them afresh), then written to the
        # token's block slot only (a scatter, as above, whose update never reads key_bounds: module docstring).
        new = k_rot[:, 0].astype(key_bounds.dtype)  # [B, K, H]
        old = cache.open_bounds  # [B, K, 2, H]
        extended = jnp.stack([jnp.maximum(old[:, :, 0], new), jnp.minimum(old[:, :, 1], new)], axis=2)
        fresh = jnp.stack([new, new], axis=2)  # [B, K, 2, H]
        open_bounds = jnp.where((slot == 0)[:, None, None, None], fresh, extended)  # [B, K, 2, H]
        key_bounds = key_bounds.at[rows, :, block].set(open_bounds)
        return KCompressionCache(blocks=blocks, remainder=remainder, key_bounds=key_bounds, open_bounds=open_bounds)
    return KCompressionCache(blocks=blocks, remainder=remainder)
