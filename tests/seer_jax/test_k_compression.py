"""The K compression cache: after prefill + decode steps it equals the compression of the whole sequence's keys;
own-coordinate blocks under left padding; capacity and memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seer_jax.decode_gate import DecodeAttnGate
from seer_jax.k_compression import KCompressionCache, append_token, compress_prompt
from seer_jax.kv_cache import KVCache
from tests.seer_jax.decode_models import DECODE_BLOCK, base_model, decode_model, padded_batch, with_decode
from tests.seer_jax.tiny_models import TINY, random_module, random_tokens

PROMPT, STEPS = 40, 30  # rows of 40 and 27 real tokens, then 30 decode steps: blocks complete at different steps


@nnx.jit
def full_forward_cache(model, tokens, mask):
    return model(tokens, attention_mask=mask)[1]


@nnx.jit
def decoded_and_recomputed(model, tokens, mask, feed):
    """The cache after prefilling `tokens` and decoding `feed` [B, C] token by token (as `generate` does), and
    the cache of one causal forward over both."""
    _, cache = model(tokens, attention_mask=mask, last_only=True)

    def step(cache, token):
        return model(token[:, None], cache=cache)[1], None

    decoded = jax.lax.scan(step, cache.padded_to(tokens.shape[1] + feed.shape[1]), feed.T)[0]
    full_mask = jnp.concatenate([mask, jnp.ones_like(feed, bool)], axis=1)
    return decoded, model(jnp.concatenate([tokens, feed], axis=1), attention_mask=full_mask)[1]


@nnx.jit
def decode_state(attention, k, mask):
    return attention.decode_state(k, k, key_mask=mask)  # no key bounds: k_rot unused


@pytest.mark.parametrize("budget", [DECODE_BLOCK, 10**6], ids=["sparse", "dense"])
def test_cache_after_decode_steps_equals_recompute(budget):
    """Prefill then decode token by token: each layer's compressed keys equal those a causal forward over the whole
    sequence computes from its pre-RoPE keys. With a small budget only layer 0's keys (which do not depend on
    attention) are the same in both; with a budget covering the context, every layer's."""
    model = decode_model(with_decode(token_budget=budget))
    tokens, mask = padded_batch(PROMPT)
    cache, full = decoded_and_recomputed(model, tokens, mask, jnp.asarray(random_tokens(5, 2, STEPS)))
    layers = [0] if budget == DECODE_BLOCK else range(TINY.num_layers)
    for layer in layers:
        ours, expected = cache.decode_states[layer], full.decode_states[layer]
        assert ours.blocks.shape == expected.blocks.shape == (2, 5, TINY.num_kv_heads, 8)  # ceil(70 / 16) slots
        np.testing.assert_allclose(np.asarray(ours.blocks), np.asarray(expected.blocks), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(ours.remainder), np.asarray(expected.remainder), rtol=1e-5, atol=1e-5)
    # 70 and 57 real tokens: 4 and 3 complete blocks, 6 and 9 tokens in the open one
    blocks, remainder = (np.asarray(x) for x in (cache.decode_states[0].blocks, cache.decode_states[0].remainder))
    assert np.abs(blocks[0, :4]).min(axis=(1, 2)).all() and not blocks[0, 4:].any() and not blocks[1, 3:].any()
    assert remainder[0, :6].any(axis=(1, 2)).all() and not remainder[0, 6:].any() and not remainder[1, 9:].any()


def numpy_key_bounds(keys: np.ndarray, mask: np.ndarray, num_blocks: int) -> np.ndarray:
    """Brute force from a KV cache [B, S, K, H] and its real slots [B, S]: per row, the channel max and min over
    each of its own blocks (its i-th real slot in block i // DECODE_BLOCK) [B, K, J, 2, H], zeros for blocks without
    tokens."""
    bounds = np.zeros((keys.shape[0], keys.shape[2], num_blocks, 2, keys.shape[3]), keys.dtype)
    for b in range(keys.shape[0]):
        real = keys[b, mask[b]]  # [n, K, H]
        for j in range(-(-len(real) // DECODE_BLOCK)):
            block = real[j * DECODE_BLOCK : (j + 1) * DECODE_BLOCK]
            bounds[b, :, j, 0], bounds[b, :, j, 1] = block.max(0), block.min(0)
    return bounds


@pytest.mark.parametrize("budget", [DECODE_BLOCK, 10**6], ids=["sparse", "dense"])
def test_key_bounds_after_decode_steps_are_those_of_the_kv_cache(budget):
    """With quest_weight > 0 each layer's block key bounds, kept through prefill and 30 decode steps (blocks
    completing at different steps in a left-padded row), equal the channel max / min of each row's own blocks of
    its KV cache (an independent brute force), in every layer and for the open blocks too (also kept on their own,
    so that a step writes its slot without reading the array); with a budget covering
    the context they also equal the bounds a causal forward over the whole sequence computes."""
    model = decode_model(with_decode(token_budget=budget, quest_weight=0.5))
    tokens, mask = padded_batch(PROMPT)
    cache, full = decoded_and_recomputed(model, tokens, mask, jnp.asarray(random_tokens(5, 2, STEPS)))
    for layer in range(TINY.num_layers):
        state = cache.decode_states[layer]
        assert state.key_bounds.shape == (2, TINY.num_kv_heads, 5, 2, TINY.head_dim)
        expected = numpy_key_bounds(np.asarray(cache.keys[layer]), np.asarray(cache.key_mask), 5)
        np.testing.assert_array_equal(np.asarray(state.key_bounds), expected)
        last = (np.asarray(cache.key_mask).sum(axis=1) - 1) // DECODE_BLOCK  # the block of each row's last token
        np.testing.assert_array_equal(np.asarray(state.open_bounds), expected[np.arange(2), :, last])
        if budget != DECODE_BLOCK:
            recomputed = full.decode_states[layer].key_bounds
            np.testing.assert_allclose(np.asarray(state.key_bounds), np.asarray(recomputed), atol=1e-5)
    plain = full_forward_cache(decode_model(with_decode(token_budget=budget)), tokens, mask).decode_states[0]
    assert plain.key_bounds is None  # quest_weight 0 keeps no bounds


def test_prompt_blocks_count_each_rows_real_tokens():
    """A left-padded row compresses exactly as the same row alone: blocks start at its first real token."""
    attention = decode_model().model.layers[1].self_attn
    k = jnp.asarray(
        np.random.default_rng(0).standard_normal((2, PROMPT, TINY.num_kv_heads, TINY.head_dim)), jnp.float32
    )
    _, mask = padded_batch(PROMPT)
    padded = decode_state(attention, k, mask)
    alone = decode_state(attention, k[1:, 13:], None)  # 27 tokens: block 0 complete, 11 in the open block
    np.testing.assert_allclose(np.asarray(padded.blocks[1, :2]), np.asarray(alone.blocks[0]), rtol=1e-6, atol=1e-6)
    assert not np.asarray(padded.blocks[1, 1:]).any()
    np.testing.assert_array_equal(np.asarray(padded.remainder[1]), np.asarray(alone.remainder[0]))
    np.testing.assert_array_equal(np.asarray(alone.remainder[0, :11]), np.asarray(k[1, 13 + 16 :]))
    assert padded.blocks.dtype == padded.remainder.dtype == jnp.float32


def test_capacity_grows_with_the_kv_cache_and_memory_per_token():
    _, mask = padded_batch(PROMPT)
    tokens = jnp.asarray(random_tokens(1, 2, PROMPT))
    cache = full_forward_cache(decode_model(with_decode(start_layer=1)), tokens, mask)
    assert cache.decode_states[0] is None  # a dense decode layer keeps no compressed keys
    grown = cache.padded_to(100)
    compressed = grown.decode_states[1]
    assert isinstance(compressed, KCompressionCache) and compressed.blocks.shape[1] == 7  # ceil(100 / 16)
    np.testing.assert_array_equal(compressed.blocks[:, :3], cache.decode_states[1].blocks)
    assert not np.asarray(compressed.blocks[:, 3:]).any()
    # blocks: K · E · itemsize / block_size bytes per token (+ a fixed block_size · K · H remainder per row)
    assert compressed.blocks.nbytes / (2 * 7 * DECODE_BLOCK) == TINY.num_kv_heads * 8 * 4 / DECODE_BLOCK
    assert compressed.remainder.shape == (2, DECODE_BLOCK, TINY.num_kv_heads, TINY.head_dim)
    with pytest.raises(ValueError, match="cannot shrink"):
        compressed.padded_to(10)
    plain = full_forward_cache(base_model(), tokens, mask)
    assert plain.decode_states is None and plain.padded_to(100).decode_states is None
    assert jax.tree.structure(plain) == jax.tree.structure(
        KVCache(keys=plain.keys, values=plain.values, key_mask=plain.key_mask, length=plain.length)
    )


@pytest.mark.parametrize("rope_at_block_end", [False, True])
def test_append_token_completes_exactly_its_block(rope_at_block_end):
    """Row 0 holds 15 tokens, row 1 holds 4: the next token completes row 0's block 0 (pooled from exactly its 16
    keys and rotated at its first position, or at its last with `rope_at_block_end`) and only enters row 1's
    remainder."""
    config = with_decode(rope_at_block_end=rope_at_block_end)
    gate = random_module(
        lambda: DecodeAttnGate(TINY, config, param_dtype=jnp.float32, rngs=nnx.Rngs(0)), 3, weight_std=0.3
    )
    k = jnp.asarray(np.random.default_rng(4).standard_normal((2, 16, TINY.num_kv_heads, TINY.head_dim)), jnp.float32)
    lengths = jnp.asarray([15, 4])
    new = jnp.stack([k[0, 15:], k[1, 4:5]])  # [B, 1, K, H]

    @nnx.jit
    def prefill_append_and_recompute(gate, k, new, lengths):
        cache = compress_prompt(gate, k, lengths).padded_to(32)
        position = 15 if rope_at_block_end else 0
        expected = gate.keys(gate.pool(k[:1]), jnp.full((1, 1), position))[0, 0]  # [K, E]
        return cache, append_token(cache, gate, new, lengths), expected

    cache, after, expected = prefill_append_and_recompute(gate, k, new, lengths)
    assert not np.asarray(cache.blocks).any()
    np.testing.assert_allclose(np.asarray(after.blocks[0, 0]), np.asarray(expected), rtol=1e-6, atol=1e-6)
    assert not np.asarray(after.blocks[0, 1:]).any() and not np.asarray(after.blocks[1]).any()
    assert not np.asarray(after.remainder[0]).any()  # cleared once its block is complete
    np.testing.assert_array_equal(np.asarray(after.remainder[1, :5]), np.asarray(k[1, :5]))
    assert not np.asarray(after.remainder[1, 5:]).any()
