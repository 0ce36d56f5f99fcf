"""`KVCache`: the keys and values of every layer for a left-padded batch, in fixed-size (static-shape) buffers.

Layout: slot s of row b holds the s-th token fed to the model for that row, padding included. With left padding all
rows share one write position, `length`, so a decode step writes slot `length` of every row. `key_mask` says which
slots hold real tokens; a token's RoPE position is the number of real tokens before it, so the next position of
each row is `key_mask.sum(-1)`, matching HF's `position_ids = cumsum(attention_mask) - 1`.

A layer may keep decode state besides its keys and values (`Attention.decode_state`; SeerAttention-R's
`KCompressionCache`): `decode_states` carries it, one entry per layer (None for a layer without), or is None when
no layer has any, so a plain model's cache is keys, values and the slot bookkeeping only. A state is a pytree with
a `padded_to(max_length)` method that makes room for `max_length` cache slots.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Per-layer key/value buffers and the slot bookkeeping shared by all layers.

    Attributes:
      keys: L arrays [B, S, K, H], rotated keys (after RoPE), in the model's compute dtype; slots >= `length` are
        unused (zeros).
      values: L arrays [B, S, K, H], like `keys`.
      key_mask: bool [B, S]. True where the slot holds a real (non-padding) token; False for padding and unused slots.
      length: int32 []. Number of slots written (the same for every row).
      decode_states: per layer, its decode state or None; None when no layer has one (module docstring).
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    key_mask: jax.Array
    length: jax.Array
    decode_states: tuple[Any, ...] | None = None

    @property
    def max_length(self) -> int:
        """S, the number of slots."""
        return self.key_mask.shape[1]

    def next_positions(self) -> jax.Array:
        """int32 [B]: the RoPE position of the next token of each row."""
        return jnp.sum(self.key_mask, axis=-1, dtype=jnp.int32)

    def decode_state(self, layer: int) -> Any:
        """Layer `layer`'s decode state, or None."""
        return None if self.decode_states is None else self.decode_states[layer]

    def padded_to(self, max_length: int) -> "KVCache":
        """The same cache with S grown to `max_length` empty slots (a prefill's cache made ready for decoding)."""
        extra = max_length - self.max_length
        if extra < 0:
            raise ValueError(f"cannot shrink a cache of {self.max_length} slots to max_length={max_length}")

        def grow(buffer: jax.Array) -> jax.Array:
            return jnp.pad(buffer, [(0, 0), (0, extra)] + [(0, 0)] * (buffer.ndim - 2))

        return KVCache(
            keys=tuple(grow(key) for key in self.keys),  # L × [B, S', K, H]
            values=tuple(grow(value) for value in self.values),  # L × [B, S', K, H]
            key_mask=grow(self.key_mask),  # [B, S']
            length=self.length,
            decode_states=None
            if self.decode_states is None
            else tuple(None if state is None else state.padded_to(max_length) for state in self.decode_states),
        )
