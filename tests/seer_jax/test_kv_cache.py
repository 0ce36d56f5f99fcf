"""`KVCache` bookkeeping."""

import jax.numpy as jnp
import numpy as np
import pytest

from seer_jax.kv_cache import KVCache


def make_cache() -> KVCache:
    key = jnp.arange(2 * 3 * 1 * 2, dtype=jnp.float32).reshape(2, 3, 1, 2)  # [B, S, K, H]
    mask = jnp.asarray([[True, True, True], [False, True, True]])
    return KVCache(keys=(key,), values=(key + 1,), key_mask=mask, length=jnp.asarray(3, jnp.int32))


def test_next_positions_count_real_tokens():
    np.testing.assert_array_equal(make_cache().next_positions(), [3, 2])


def test_padded_to_adds_empty_slots():
    cache = make_cache()
    grown = cache.padded_to(5)
    assert grown.max_length == 5 and int(grown.length) == 3
    np.testing.assert_array_equal(grown.keys[0][:, :3], cache.keys[0])
    assert not np.asarray(grown.keys[0][:, 3:]).any() and not np.asarray(grown.key_mask[:, 3:]).any()
    np.testing.assert_array_equal(grown.next_positions(), cache.next_positions())
    with pytest.raises(ValueError, match="cannot shrink"):
        cache.padded_to(2)
