"""Decode score sources and their selections against brute-force NumPy on a left-padded, ragged batch; per-query-head
masks in the sparse decode attention against per-head masked attention."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seer_jax.decode_config import DECODE_SOURCE_NAMES, DecodeConfig
from seer_jax.decode_scores import (
    DECODE_SOURCES,
    DecodeScoreInputs,
    oracle_decode_scores,
    quest_decode_scores,
    random_decode_scores,
    row_blocks,
    streaming_decode_scores,
)
from seer_jax.decode_selection import decode_block_lists, decode_key_mask, max_selected_blocks, select_decode_blocks
from seer_jax.k_compression import compress_prompt
from seer_jax.rope import apply_rope
from tests.seer_jax.decode_models import DECODE, decode_model, with_decode
from tests.seer_jax.tiny_models import TINY as TINY_MODEL

BLOCK = 4
NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 2, 8
SLOTS = 30  # J = 8 blocks, the last one partial
# Left padding and real tokens per row: a full row, a padded ragged one, one with 1 real token, one ending mid-way
# (empty slots after its tokens, as in a cache being decoded into), one with a just-completed block.
PADDING = np.asarray([0, 7, 29, 3, 10])
LENGTHS = np.asarray([30, 23, 1, 17, 16])
TINY = np.log(np.finfo(np.float32).tiny)


def batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q [B, N, H], k [B, S, K, H] (garbage in padding and empty slots) and the real slots bool [B, S]."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((len(PADDING), NUM_Q_HEADS, HEAD_DIM)).astype(np.float32)
    k = 2.0 * rng.standard_normal((len(PADDING), SLOTS, NUM_KV_HEADS, HEAD_DIM)).astype(np.float32)
    slots = np.arange(SLOTS)[None, :]
    key_mask = (slots >= PADDING[:, None]) & (slots < (PADDING + LENGTHS)[:, None])
    return q, k, key_mask


def own_blocks(key_mask_row: np.ndarray) -> list[np.ndarray]:
    """The slots of each of a row's own blocks: its i-th real slot belongs to block i // BLOCK."""
    real = np.flatnonzero(key_mask_row)
    return [real[start : start + BLOCK] for start in range(0, len(real), BLOCK)]


def numpy_oracle(q, k, key_mask) -> np.ndarray:
    scores = np.full((len(q), NUM_KV_HEADS, -(-SLOTS // BLOCK)), TINY)
    group = NUM_Q_HEADS // NUM_KV_HEADS
    for b in range(len(q)):
        real = np.flatnonzero(key_mask[b])
        for n in range(NUM_Q_HEADS):
            logits = k[b, real, n // group].astype(np.float64) @ q[b, n] / np.sqrt(HEAD_DIM)
            probs = dict(zip(real, np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum(), strict=True))
            for j, slots in enumerate(own_blocks(key_mask[b])):
                best = np.log(max(probs[s] for s in slots))
                scores[b, n // group, j] = max(scores[b, n // group, j], best)
    return scores


def numpy_quest(q, k, key_mask) -> np.ndarray:
    scores = np.zeros((len(q), NUM_Q_HEADS, -(-SLOTS // BLOCK)))
    group = NUM_Q_HEADS // NUM_KV_HEADS
    for b in range(len(q)):
        for n in range(NUM_Q_HEADS):
            for j, slots in enumerate(own_blocks(key_mask[b])):
                keys = k[b, slots, n // group].astype(np.float64)  # [slots, H]
                bound = np.maximum(q[b, n] * keys.max(0), q[b, n] * keys.min(0)).sum() / np.sqrt(HEAD_DIM)
                scores[b, n, j] = bound
    return scores


def test_registry_serves_every_configurable_source():
    assert tuple(DECODE_SOURCES) == DECODE_SOURCE_NAMES


def test_row_blocks_gather_each_rows_real_tokens():
    _, k, key_mask = batch()
    blocks, valid = (np.asarray(x) for x in row_blocks(jnp.asarray(k), jnp.asarray(key_mask), BLOCK))
    assert blocks.shape == (len(PADDING), 8, BLOCK, NUM_KV_HEADS, HEAD_DIM) and valid.shape == (len(PADDING), 8, BLOCK)
    for b in range(len(PADDING)):
        np.testing.assert_array_equal(valid[b].reshape(-1), np.arange(8 * BLOCK) < LENGTHS[b])
        np.testing.assert_array_equal(blocks[b].reshape(-1, NUM_KV_HEADS, HEAD_DIM)[: LENGTHS[b]], k[b, key_mask[b]])


def test_oracle_scores_match_numpy():
    q, k, key_mask = batch()
    ours = np.asarray(oracle_decode_scores(jnp.asarray(q), jnp.asarray(k), jnp.asarray(key_mask), block_size=BLOCK))
    np.testing.assert_allclose(ours, numpy_oracle(q, k, key_mask), rtol=1e-5, atol=1e-5)


def test_quest_scores_match_numpy_and_bound_the_logits():
    q, k, key_mask = batch()
    ours = np.asarray(quest_decode_scores(jnp.asarray(q), jnp.asarray(k), jnp.asarray(key_mask), block_size=BLOCK))
    expected = numpy_quest(q, k, key_mask)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
    group = NUM_Q_HEADS // NUM_KV_HEADS
    for b in range(len(PADDING)):
        for j, slots in enumerate(own_blocks(key_mask[b])):
            keys = k[b, slots][:, np.arange(NUM_Q_HEADS) // group]  # [slots, N, H]
            logits = np.einsum("snh,nh->sn", keys, q[b]) / np.sqrt(HEAD_DIM)  # [slots, N]
            assert (logits.max(0) <= ours[b, :, j] + 1e-5).all()


def expected_streaming(current: int, budget: int, force_sink: bool) -> set[int]:
    """StreamingLLM: the current block, the sink, and the most recent completed blocks filling the budget."""
    if force_sink:
        recent = set(range(max(1, current - budget), current))
        return {0, current} | recent
    ranked = ([0] if current else []) + list(range(current - 1, 0, -1))  # the sink first, then most recent first
    return {current} | set(ranked[:budget])


@pytest.mark.parametrize("force_sink", [True, False], ids=["sink", "no-sink"])
@pytest.mark.parametrize("budget", [0, 2, 5, 20])
def test_streaming_selection(budget, force_sink):
    lengths = jnp.asarray(LENGTHS)
    config = DecodeConfig(block_size=BLOCK, token_budget=budget * BLOCK, source="streaming", force_sink=force_sink)
    scores = streaming_decode_scores((len(LENGTHS), NUM_KV_HEADS, 8))
    selected = np.asarray(select_decode_blocks(scores, lengths, config))
    for b, length in enumerate(LENGTHS):
        expected = expected_streaming((length - 1) // BLOCK, budget, force_sink)
        for head in range(NUM_KV_HEADS):
            assert set(np.flatnonzero(selected[b, head])) == expected, (b, head)


def numpy_top(scores_row: np.ndarray, current: int, count: int, force_sink: bool) -> set[int]:
    """Forced blocks plus the `count` best non-forced completed blocks (ties to the lower block)."""
    forced = {current} | ({0} if force_sink else set())
    candidates = [j for j in range(current) if j not in forced]
    return forced | set(sorted(candidates, key=lambda j: (-scores_row[j], j))[:count])


@pytest.mark.parametrize("method", ["token_budget", "context_fraction"])
@pytest.mark.parametrize("source", ["oracle", "quest"])
def test_oracle_and_quest_selections_match_numpy(source, method):
    """The source's scores through the selection rules, against NumPy's scores and NumPy's top-k; quest per query
    head, oracle per kv head."""
    q, k, key_mask = batch(1)
    config = DecodeConfig(block_size=BLOCK, source=source, method=method, token_budget=2 * BLOCK, context_fraction=0.3)
    score = oracle_decode_scores if source == "oracle" else quest_decode_scores
    scores = score(jnp.asarray(q), jnp.asarray(k), jnp.asarray(key_mask), block_size=BLOCK)
    selected = np.asarray(select_decode_blocks(scores, jnp.asarray(LENGTHS), config))
    reference = (numpy_oracle if source == "oracle" else numpy_quest)(q, k, key_mask)
    assert selected.shape == reference.shape == (len(PADDING), NUM_KV_HEADS if source == "oracle" else NUM_Q_HEADS, 8)
    for b, length in enumerate(LENGTHS):
        count = 2 if method == "token_budget" else int(np.floor(np.float32(0.3) * np.float32(length) / BLOCK))
        for head in range(selected.shape[1]):
            expected = numpy_top(reference[b, head], (length - 1) // BLOCK, count, force_sink=True)
            assert set(np.flatnonzero(selected[b, head])) == expected, (b, head)


def test_random_scores_depend_on_key_and_position_only():
    key = jax.random.key(3)
    positions = jnp.asarray([5, 40, 5])
    scores = np.asarray(random_decode_scores(key, positions, (3, NUM_KV_HEADS, 8)))
    assert ((scores >= 0) & (scores < 1)).all()
    np.testing.assert_array_equal(scores[0], scores[2])  # the same position draws the same, whatever the row
    assert not np.array_equal(scores[0], scores[1])
    other_layer = np.asarray(random_decode_scores(jax.random.fold_in(key, 1), positions, (3, NUM_KV_HEADS, 8)))
    assert not np.array_equal(scores, other_layer)


def test_random_selection_is_the_budget_of_uniform_blocks():
    """Over many steps of one 24-block row (sink forced, current block 23), each of the 22 other completed blocks is
    chosen about budget / 22 of the time, exactly `budget` of them each step, in every kv head."""
    steps, budget = 400, 5
    config = DecodeConfig(block_size=BLOCK, token_budget=budget * BLOCK, source="random")
    positions = jnp.arange(steps) + 1000
    scores = random_decode_scores(jax.random.key(0), positions, (steps, NUM_KV_HEADS, 24))
    lengths = jnp.full((steps,), 24 * BLOCK)
    selected = np.asarray(select_decode_blocks(scores, lengths, config))
    assert selected[:, :, [0, 23]].all()
    np.testing.assert_array_equal(selected[:, :, 1:23].sum(-1), budget)
    frequency = selected[:, :, 1:23].mean(axis=(0, 1))  # [22]
    np.testing.assert_allclose(frequency, budget / 22, atol=0.06)
    for step in range(3):  # the chosen ones are the top-scored
        for head in range(NUM_KV_HEADS):
            row = np.asarray(scores[step, head])
            assert set(np.flatnonzero(selected[step, head])) == numpy_top(row, 23, budget, force_sink=True)


def numpy_masked_attention(q, k, v, allowed) -> np.ndarray:
    """q [B, N, H], k/v [B, S, K, H], allowed bool [B, N, S] → [B, N, H]."""
    out = np.zeros(q.shape)
    group = q.shape[1] // k.shape[2]
    for b in range(q.shape[0]):
        for n in range(q.shape[1]):
            keys = np.flatnonzero(allowed[b, n])
            logits = k[b, keys, n // group].astype(np.float64) @ q[b, n] / np.sqrt(q.shape[-1])
            probs = np.exp(logits - logits.max())
            out[b, n] = (probs / probs.sum()) @ v[b, keys, n // group]
    return out


@pytest.mark.parametrize("per", ["kv_head", "q_head"])
def test_attend_selected_is_per_head_masked_attention(per):
    """Per-query-head masks (different within a kv group) and per-kv-head masks, each against NumPy attention over
    exactly the allowed slots of each query head."""
    layer = decode_model().model.layers[0].self_attn
    num_q_heads, num_kv_heads, head_dim = layer.num_q_heads, layer.num_kv_heads, layer.head_dim
    rng = np.random.default_rng(4)
    batch_size, slots = 2, 40
    q = rng.standard_normal((batch_size, 1, num_q_heads, head_dim)).astype(np.float32)
    k, v = rng.standard_normal((2, batch_size, slots, num_kv_heads, head_dim)).astype(np.float32)
    heads = num_kv_heads if per == "kv_head" else num_q_heads
    allowed = rng.random((batch_size, heads, slots)) < 0.4
    allowed[:, :, 7] = True  # no head without a key
    out = np.asarray(layer._attend_selected(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(allowed)))
    per_q_head = np.repeat(allowed, num_q_heads // heads, axis=1)  # [B, N, S]
    np.testing.assert_allclose(out[:, 0], numpy_masked_attention(q[:, 0], k, v, per_q_head), rtol=1e-5, atol=1e-5)


def test_quest_key_mask_is_per_query_head():
    """A per-query-head selection turns into per-query-head cache slots, each row in its own blocks."""
    _, _, key_mask = batch()
    block_mask = np.zeros((len(PADDING), NUM_Q_HEADS, 8), bool)
    block_mask[:, 1, 0] = True
    block_mask[:, 2, 1] = True
    allowed = np.asarray(decode_key_mask(jnp.asarray(block_mask), jnp.asarray(key_mask), BLOCK))
    assert allowed.shape == (len(PADDING), NUM_Q_HEADS, SLOTS)
    for b in range(len(PADDING)):
        blocks = own_blocks(key_mask[b])
        assert not allowed[b, [0, 3]].any()
        np.testing.assert_array_equal(np.flatnonzero(allowed[b, 1]), blocks[0])
        np.testing.assert_array_equal(np.flatnonzero(allowed[b, 2]), blocks[1] if len(blocks) > 1 else [])


@pytest.mark.parametrize("budget_blocks", [2, 100], ids=["budget", "all"])
def test_attend_blocks_reads_each_rows_own_blocks_of_a_left_padded_cache(budget_blocks):
    """The decode-kernel path (`block_sparse_decode` with each row's first real slot as its start) against NumPy
    attention over the slots of the selected own blocks, on a left-padded ragged cache with empty slots after the
    real tokens; selections as the token budget makes them (at most budget + forced blocks)."""
    decode = dataclasses.replace(DECODE, token_budget=budget_blocks * DECODE.block_size)
    layer = decode_model(decode).model.layers[0].self_attn
    num_q_heads, num_kv_heads, head_dim = layer.num_q_heads, layer.num_kv_heads, layer.head_dim
    block = decode.block_size
    rng = np.random.default_rng(5)
    padding, lengths, slots = np.asarray([0, 21, 40]), np.asarray([70, 49, 17]), 80
    key_mask = (np.arange(slots)[None] >= padding[:, None]) & (np.arange(slots)[None] < (padding + lengths)[:, None])
    q = rng.standard_normal((3, 1, num_q_heads, head_dim)).astype(np.float32)
    k, v = rng.standard_normal((2, 3, slots, num_kv_heads, head_dim)).astype(np.float32)
    scores = rng.standard_normal((3, num_kv_heads, -(-slots // block))).astype(np.float32)
    block_mask = select_decode_blocks(jnp.asarray(scores), jnp.asarray(lengths, jnp.int32), decode)  # [B, K, J]
    index, count = decode_block_lists(
        jnp.asarray(scores), jnp.asarray(lengths, jnp.int32), decode, max_selected_blocks(decode, scores.shape[-1])
    )
    out = layer._attend_blocks(*(jnp.asarray(x) for x in (q, k, v, index, count, key_mask)))
    allowed = np.asarray(decode_key_mask(block_mask, jnp.asarray(key_mask), block))  # [B, K, S]
    assert (allowed.sum(-1) < key_mask.sum(-1)[:, None]).any() == (budget_blocks == 2)
    per_q_head = np.repeat(allowed, num_q_heads // num_kv_heads, axis=1)  # [B, N, S]
    expected = numpy_masked_attention(q[:, 0], k, v, per_q_head)
    np.testing.assert_allclose(np.asarray(out)[:, 0], expected, rtol=1e-5, atol=1e-5)


def test_gate_plus_quest_adds_the_weighted_group_max_of_quests_bound():
    """quest_weight w: the "gate" source's scores are the gate's own logits (the same gate at w = 0) plus w × the max
    over each kv head's query heads of Quest's bound recomputed from the KV cache (`quest_decode_scores`, checked
    against NumPy above), on a ragged batch whose second row has an open block."""
    rng = np.random.default_rng(3)
    lengths = jnp.asarray([40, 27])
    slots, heads, kv_heads, head_dim = 48, TINY_MODEL.num_q_heads, TINY_MODEL.num_kv_heads, TINY_MODEL.head_dim
    k = jnp.asarray(rng.standard_normal((2, slots, kv_heads, head_dim)), jnp.float32)
    q = jnp.asarray(rng.standard_normal((2, 1, heads, head_dim)), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(slots), (2, slots))
    rope = decode_model().model.layers[1].self_attn.rope
    k_rot, q_rot = apply_rope(k, positions, rope), apply_rope(q, (lengths - 1)[:, None], rope)
    key_mask = jnp.arange(slots)[None, :] < lengths[:, None]

    def scores(weight):
        gate = decode_model(with_decode(quest_weight=weight)).model.layers[1].self_attn.decode_gate
        state = compress_prompt(gate, k, lengths, k_rot)
        inputs = DecodeScoreInputs(
            q=q, q_rot=q_rot, k_cache=k_rot, key_mask=key_mask, gate=gate, state=state, key=jax.random.key(0)
        )
        return np.asarray(DECODE_SOURCES["gate"](inputs))

    quest = np.asarray(quest_decode_scores(q_rot[:, 0], k_rot, key_mask, block_size=16))  # [B, N, J]
    group_max = quest.reshape(2, kv_heads, heads // kv_heads, -1).max(axis=2)  # [B, K, J]
    gate_only = scores(0.0)
    assert gate_only.shape == group_max.shape == (2, kv_heads, 3)
    np.testing.assert_allclose(scores(0.5), gate_only + 0.5 * group_max, rtol=1e-5, atol=1e-5)
    assert np.abs(group_max).max() > 0.1  # the bound moves the scores
