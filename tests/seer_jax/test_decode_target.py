"""The decode gate's distillation inputs: the per-token target against a brute-force dense computation (the whole
softmax matrix), row alignment of a left-padded batch, and the gate's training logits against its decode-step
scores over the compressed keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seer_jax.decode_scores import DECODE_SOURCES
from seer_jax.decode_target import decode_target
from seer_jax.forwards import decode_distillation_inputs, decode_gate_logits, joint_distillation_inputs
from seer_jax.gate import MASKED_LOGIT
from seer_jax.k_compression import compress_prompt
from seer_jax.model import positions_from_mask
from seer_jax.rope import apply_rope
from tests.seer_jax.decode_models import DECODE_BLOCK, decode_model, padded_batch, with_decode
from tests.seer_jax.tiny_models import TINY, random_tokens


def brute_force_target(q, k, lengths, block_size):
    """float64 [B, K, T, J] from the full softmax matrix: P1 = per q head the max probability over the keys c <= t of
    each block, max over the group, own and later blocks zeroed, padding rows zeroed, rows renormalised."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    batch, length, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_q_heads // num_kv_heads
    num_blocks = -(-length // block_size)
    k_heads = np.repeat(k, group, axis=2)  # [B, S, N, H]
    scores = np.einsum("btnh,bsnh->bnts", q, k_heads) / np.sqrt(head_dim)  # [B, N, T, S]
    causal = np.tril(np.ones((length, length), bool))
    scores = np.where(causal, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)  # [B, N, T, S]: the whole softmax matrix
    padded = np.pad(probs, [(0, 0), (0, 0), (0, 0), (0, num_blocks * block_size - length)])
    p1 = padded.reshape(batch, num_q_heads, length, num_blocks, block_size).max(-1)  # [B, N, T, J]
    p1 = p1.reshape(batch, num_kv_heads, group, length, num_blocks).max(2)  # [B, K, T, J]
    rows, blocks = np.arange(length)[:, None], np.arange(num_blocks)[None, :]
    p1 = np.where(blocks < rows // block_size, p1, 0.0)
    p1 = np.where((np.arange(length)[None, :] < np.asarray(lengths)[:, None])[:, None, :, None], p1, 0.0)
    total = p1.sum(-1, keepdims=True)
    return np.where(total > 0, p1 / np.where(total > 0, total, 1.0), 0.0)


@pytest.mark.parametrize(
    "num_q_heads, num_kv_heads, length, block_size, chunk",
    [(4, 2, 100, 16, 32), (6, 2, 77, 8, 77), (2, 2, 64, 16, 24), (8, 1, 50, 16, 7)],
)
def test_target_equals_the_dense_softmax_computation(num_q_heads, num_kv_heads, length, block_size, chunk):
    rng = np.random.default_rng(length)
    batch, head_dim = 3, 16
    lengths = np.array([length, length - 19, 23])  # ragged rows, real tokens first (row-aligned)
    # Peaky attention (large scores) so the per-block maxima differ by orders of magnitude.
    q = rng.standard_normal((batch, length, num_q_heads, head_dim)) * 3
    k = rng.standard_normal((batch, length, num_kv_heads, head_dim))
    past_end = (np.arange(length)[None, :] >= lengths[:, None])[:, :, None, None]
    q = np.where(past_end, rng.standard_normal(q.shape) * 1e3, q)  # poisoned padding: must not leak into real rows
    k = np.where(past_end, rng.standard_normal(k.shape) * 1e3, k)
    got = decode_target(
        jnp.asarray(q, jnp.float32),
        jnp.asarray(k, jnp.float32),
        block_size=block_size,
        lengths=jnp.asarray(lengths),
        query_chunk=chunk,
    )
    expected = brute_force_target(q, k, lengths, block_size)
    assert got.shape == expected.shape == (batch, num_kv_heads, length, -(-length // block_size))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-5, atol=1e-6)
    counted = expected.sum(-1)  # rows with a completed block sum to 1, the others (t < block_size, padding) to 0
    expected_rows = (np.arange(length)[None, :] >= block_size) & (np.arange(length)[None, :] < lengths[:, None])
    np.testing.assert_allclose(counted, np.broadcast_to(expected_rows[:, None], counted.shape), atol=1e-9)
    spread = (np.asarray(got)[:, :, 2 * block_size :] > 0.05).sum(-1)  # rows with several completed blocks
    assert spread.max() >= 2  # structured: not one-hot everywhere


def _first_layer_qk(model, tokens, mask):
    """Layer 0's pre-RoPE q/k and rotated q/k, computed by hand."""
    layer = model.model.layers[0]
    q, k, _ = layer.self_attn.project_qkv(layer.input_layernorm(model.model.embed_tokens(tokens)))
    positions = positions_from_mask(mask)
    return q, k, apply_rope(q, positions, TINY.rope), apply_rope(k, positions, TINY.rope)


def test_left_padded_rows_get_their_own_targets_and_features():
    """Row b of a left-padded batch gets exactly what it gets alone: features and target in its own coordinates
    (real tokens first); layer 0's target is the brute-force target of its rotated q/k."""
    model = decode_model()
    length, padding = 70, (0, 13, 29)
    tokens, mask = padded_batch(length, padding)
    features, targets = nnx.jit(decode_distillation_inputs)(model, tokens, mask)
    assert len(features) == len(targets) == TINY.num_layers
    for row, pad in enumerate(padding):
        alone_features, alone_targets = nnx.jit(decode_distillation_inputs)(model, tokens[row : row + 1, pad:], None)
        real = length - pad
        assert int(features[0].lengths[row]) == real and int(alone_features[0].lengths[0]) == real
        for layer in range(TINY.num_layers):
            np.testing.assert_allclose(features[layer].q[row, :real], alone_features[layer].q[0], atol=1e-5)
            np.testing.assert_allclose(
                features[layer].k[row], _padded_blocks(alone_features[layer].k[0], length), atol=1e-5
            )
            np.testing.assert_allclose(
                targets[layer][row, :, :real], _padded_blocks(alone_targets[layer][0], length, axis=-1), atol=1e-5
            )
            np.testing.assert_array_equal(np.asarray(targets[layer][row, :, real:]), 0.0)
    _, _, q_rot, k_rot = _first_layer_qk(model, tokens[:1], mask[:1])
    np.testing.assert_allclose(targets[0][:1], brute_force_target(q_rot, k_rot, [length], DECODE_BLOCK), atol=1e-5)


def _padded_blocks(x, length, axis=0):
    """A single row's per-block array padded with zero blocks to the batch's ceil(length / DECODE_BLOCK)."""
    x = np.asarray(x)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, -(-length // DECODE_BLOCK) - x.shape[axis])
    return np.pad(x, pad)


def test_training_logits_equal_the_decode_step_scores_over_the_compressed_keys():
    """Token t's training logits over its completed blocks are what a decode step at t scores: the gate query at
    position t against the compressed prompt keys (`k_compression.compress_prompt`); other blocks are masked."""
    model = decode_model()
    tokens, mask = padded_batch(70, (0, 13))
    features, _ = nnx.jit(decode_distillation_inputs)(model, tokens, mask)
    logits = nnx.jit(decode_gate_logits)(model, features)
    gate = model.model.layers[1].self_attn.decode_gate
    layer_logits = np.asarray(logits[1])  # [B, K, T, J]
    cache = compress_prompt(gate, _aligned_k(model, tokens, mask), features[1].lengths)
    lengths = np.asarray(features[1].lengths)
    for row in range(2):
        for t in (DECODE_BLOCK, 37, int(lengths[row]) - 1):
            q_gate = gate.query(features[1].q[row : row + 1, t : t + 1], jnp.array([[t]]))[:, 0]  # [1, K, E]
            scores = np.asarray(gate.scores(q_gate, cache.blocks[row : row + 1]))[0]  # [K, J]
            completed = t // DECODE_BLOCK
            np.testing.assert_allclose(layer_logits[row, :, t, :completed], scores[:, :completed], rtol=1e-4, atol=1e-5)
            np.testing.assert_array_equal(layer_logits[row, :, t, completed:], MASKED_LOGIT)
    assert np.std(layer_logits[layer_logits > MASKED_LOGIT]) > 0.1


def _aligned_k(model, tokens, mask):
    """Layer 1's pre-RoPE keys, each row's real tokens first."""
    layer0, layer1 = model.model.layers[0], model.model.layers[1]
    positions = positions_from_mask(mask)
    hidden = model.model.embed_tokens(tokens)
    hidden, _, _ = layer0(hidden, positions, key_mask=mask)
    _, k, _ = layer1.self_attn.project_qkv(layer1.input_layernorm(hidden))
    lengths = jnp.sum(mask, axis=-1)
    shift = tokens.shape[1] - lengths
    source = (jnp.arange(tokens.shape[1])[None, :] + shift[:, None]) % tokens.shape[1]
    return jnp.take_along_axis(k, source[:, :, None, None], axis=1)


def test_joint_inputs_equal_the_separate_ones():
    """`joint_distillation_inputs` (both gates from one forward) returns what the two separate forwards return (up
    to rounding: the joint forward takes its dense attention from the pooling kernel)."""
    model = decode_model()
    tokens, mask = padded_batch(70, (0, 13))
    (features, targets), (decode_features, decode_targets) = nnx.jit(joint_distillation_inputs)(model, tokens, mask)
    from seer_jax.forwards import distillation_inputs

    expected_prefill = nnx.jit(distillation_inputs)(model, tokens, mask)
    expected_decode = nnx.jit(decode_distillation_inputs)(model, tokens, mask)
    got = jax.tree.leaves(((features, targets), (decode_features, decode_targets)))
    for a, b in zip(got, jax.tree.leaves((expected_prefill, expected_decode)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_decode_collects_need_a_decode_config():
    model = decode_model(None)
    tokens = jnp.asarray(np.random.default_rng(0).integers(2, TINY.vocab_size, (1, 40)), jnp.int32)
    with pytest.raises(ValueError, match="no decode gates"):
        model.forward(tokens, collect=("decode_target",))


def _recorded_decode_gate_scores(model, tokens, mask, fed):
    """The scores the "gate" source returns at each teacher-forced decode step (prefill `tokens` with left padding
    `mask`, then one jitted decode step per token of `fed` [B, C]): f32 [steps, layers, B, K, J]."""
    source, recorded = DECODE_SOURCES["gate"], []

    def recording(inputs):
        scores = source(inputs)
        jax.debug.callback(lambda value: recorded.append(np.asarray(value)), scores, ordered=True)  # layers in order
        return scores

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(DECODE_SOURCES, "gate", recording)
        _, cache = nnx.jit(lambda model, tokens, mask: model(tokens, attention_mask=mask, last_only=True))(
            model, tokens, mask
        )
        cache = cache.padded_to(tokens.shape[1] + fed.shape[1])
        step = nnx.jit(lambda model, token, cache: model.forward(token, cache=cache)[1])
        for index in range(fed.shape[1]):
            cache = step(model, fed[:, index : index + 1], cache)
        jax.effects_barrier()
    return np.stack(recorded).reshape(fed.shape[1], TINY.num_layers, *recorded[0].shape)


@pytest.mark.parametrize(
    "rope_at_block_end, quest_weight", [(False, 0.0), (True, 0.0), (False, 0.5)], ids=["gate", "rope_at_end", "hybrid"]
)
def test_training_logits_equal_the_scores_of_teacher_forced_decode_steps(rope_at_block_end, quest_weight):
    """The decode gate learns on the logits it will compute: for every decode step of a left-padded batch (rows of
    40, 27 and 32 prompt tokens, blocks of 16, 30 steps: prompt blocks, blocks completed while decoding, the steps
    right after a completion and the completing steps themselves), the scores a decode step computes over the
    compressed keys equal the training logits of that token over its completed earlier blocks (the ones selection
    ranks), from one training forward over the whole sequence. A budget covering the context keeps every layer's
    inputs the dense forward's. `rope_at_block_end` (the official inference) rotates blocks completed while decoding
    at their last position, so there the two differ: the check that this comparison sees the compressed keys. With
    a quest weight the decode step ranks by the hybrid (gate + w × Quest's bound from the kept key bounds), and the
    training forward collects each token's bound (`quest=True`): the hybrid logits match too."""
    model = decode_model(with_decode(rope_at_block_end=rope_at_block_end, quest_weight=quest_weight))
    prompt, steps = 40, 30
    padding = (0, 13, 8)
    tokens, mask = padded_batch(prompt, padding)
    fed = jnp.asarray(random_tokens(7, len(padding), steps))
    decoded = _recorded_decode_gate_scores(model, tokens, mask, fed)
    whole_mask = jnp.concatenate([mask, jnp.ones(fed.shape, bool)], axis=1)
    inputs = nnx.jit(decode_distillation_inputs, static_argnames="quest")
    features, _ = inputs(model, jnp.concatenate([tokens, fed], axis=1), whole_mask, quest=quest_weight > 0)
    assert all((layer.quest is not None) == (quest_weight > 0) for layer in features)
    training = [np.asarray(layer) for layer in nnx.jit(decode_gate_logits)(model, features)]  # [B, K, T, J] each
    mismatched = []
    for step in range(steps):
        for row, pad in enumerate(padding):
            t = prompt - pad + step  # the decoded token's index in its row
            scored = t // DECODE_BLOCK  # completed earlier blocks: the ones selection ranks
            for layer in range(TINY.num_layers):
                got = decoded[step][layer][row, :, :scored]  # [K, scored]
                expected = training[layer][row, :, t, :scored]
                if not np.allclose(got, expected, rtol=1e-4, atol=1e-4):
                    mismatched.append((step, row, layer, t))
    if not rope_at_block_end:
        assert not mismatched
        assert np.std(training[1][training[1] > MASKED_LOGIT]) > 0.1
    else:  # exactly the steps that score a block completed while decoding (ending at index >= the prompt) differ
        first_decoded = {row: (prompt - pad) // DECODE_BLOCK for row, pad in enumerate(padding)}
        expected = {
            (step, row)
            for step in range(steps)
            for row, pad in enumerate(padding)
            if (prompt - pad + step) // DECODE_BLOCK > first_decoded[row]
        }
        assert {(step, row) for step, row, _, _ in mismatched} == expected
