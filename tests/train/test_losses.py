"""The losses: cross-entropy against a direct computation, remat's gradients against plain autodiff, the gates' KL
against NumPy, the decode gates' KL against hand-computed values and NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tests.train.tiny import VOCAB, tiny_model
from train.losses import decode_gate_kl_loss, evaluate_loss, gate_kl_loss, next_token_loss


def test_loss_is_the_mean_next_token_cross_entropy():
    model = tiny_model()
    tokens = np.random.default_rng(0).integers(0, VOCAB, (3, 64)).astype(np.int32)
    loss, metrics = next_token_loss(model, jnp.asarray(tokens), jax.random.key(0))
    logits = np.asarray(model(jnp.asarray(tokens))[0], np.float64)  # [B, T, V]
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -np.take_along_axis(log_probs[:, :-1], tokens[:, 1:, None], axis=-1).mean()
    assert metrics == {}
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(evaluate_loss(model, tokens, batch_size=2), expected, rtol=1e-5)


def test_remat_gives_the_same_loss_and_gradients():
    model = tiny_model(seed=3)
    graphdef, params = nnx.split(model)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (2, 64)), jnp.int32)

    def loss_of(params, remat):
        return next_token_loss(nnx.merge(graphdef, params), tokens, jax.random.key(0), remat=remat)[0]

    plain = jax.jit(jax.value_and_grad(lambda p: loss_of(p, False)))(params)
    remat = jax.jit(jax.value_and_grad(lambda p: loss_of(p, True)))(params)
    np.testing.assert_allclose(remat[0], plain[0], rtol=1e-6)
    for ours, reference in zip(jax.tree.leaves(remat[1]), jax.tree.leaves(plain[1]), strict=True):
        assert np.abs(np.asarray(reference)).max() > 0
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-7)

    # remat=True puts each decoder layer under jax.checkpoint (a `remat2` equation in jax 0.10); False has none.
    def checkpointed(remat: bool) -> int:
        equations = jax.make_jaxpr(lambda p: loss_of(p, remat))(params).jaxpr.eqns
        return sum(eqn.primitive.name in ("checkpoint", "remat", "remat2") for eqn in equations)

    assert checkpointed(True) == 2 and checkpointed(False) == 0


def _numpy_kl(logits, target):
    first = logits.shape[-2] // 4
    z = logits[..., first:, :].astype(np.float64)
    log_q = z - z.max(-1, keepdims=True)
    log_q = log_q - np.log(np.exp(log_q).sum(-1, keepdims=True))
    p = target[..., first:, :].astype(np.float64)
    terms = np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - log_q), 0.0)
    return terms.mean()


def test_kl_loss_matches_numpy():
    rng = np.random.default_rng(0)
    logits, targets = [], []
    for num_blocks in (9, 16):
        causal = np.tril(np.ones((num_blocks, num_blocks), bool))
        raw = np.where(causal, rng.random((2, 3, num_blocks, num_blocks)), 0.0)
        targets.append(raw / raw.sum(-1, keepdims=True))
        logits.append(np.where(causal, rng.standard_normal(raw.shape) * 2, -1e9))
    loss, per_layer = gate_kl_loss(
        [jnp.asarray(x, jnp.float32) for x in logits], [jnp.asarray(x, jnp.float32) for x in targets], scale=10.0
    )
    expected = [_numpy_kl(lg, tg) for lg, tg in zip(logits, targets, strict=True)]
    np.testing.assert_allclose(per_layer, expected, rtol=1e-5)
    np.testing.assert_allclose(loss, 10.0 * sum(expected), rtol=1e-5)


def test_kl_loss_is_zero_when_the_gate_matches_the_target():
    causal = np.tril(np.ones((8, 8), bool))
    target = np.where(causal, np.random.default_rng(1).random((1, 2, 8, 8)) + 0.1, 0.0)
    target /= target.sum(-1, keepdims=True)
    logits = np.where(causal, np.log(np.where(causal, target, 1.0)), -1e9)
    loss, _ = gate_kl_loss([jnp.asarray(logits, jnp.float32)], [jnp.asarray(target, jnp.float32)], scale=10.0)
    assert abs(float(loss)) < 1e-5


def _decode_logits(raw, block_size):
    """raw [B, K, T, J] → the gate's masked logits (blocks j >= t // block_size at -1e9)."""
    length, num_blocks = raw.shape[-2:]
    completed = np.arange(num_blocks)[None, :] < (np.arange(length) // block_size)[:, None]
    return np.where(completed, raw, -1e9)


def test_decode_kl_loss_on_hand_made_rows():
    """Uniform gate logits against one-hot targets: each counted row's KL is log(its completed blocks). Rows
    t < max(block_size, L // 2) and t >= L do not count, however wrong the gate is on them."""
    block_size, length = 2, 8
    logits = _decode_logits(np.zeros((1, 1, length, 4)), block_size)
    target = np.zeros((1, 1, length, 4))
    target[..., 4:, 0] = 1.0  # one-hot on block 0: KL = log(t // 2) = log 2, log 2, log 3, log 3 for t = 4 … 7
    target[..., :4, 3] = 1.0  # rows t < L // 2 on a masked block: a KL of ~1e9 if they counted
    loss, per_layer = decode_gate_kl_loss(
        [jnp.asarray(logits, jnp.float32)],
        [jnp.asarray(target, jnp.float32)],
        jnp.array([length]),
        block_size=block_size,
        slice_ratio=0.5,
        scale=10.0,
    )
    np.testing.assert_allclose(per_layer, [np.log(6.0) / 2], rtol=1e-6)  # (2 log 2 + 2 log 3) / 4 rows
    np.testing.assert_allclose(loss, 10.0 * np.log(6.0) / 2, rtol=1e-6)
    # A row of length 6: counted rows t = max(2, 3) … 5, i.e. log 1, log 2, log 2; rows 6, 7 are padding.
    _, per_layer = decode_gate_kl_loss(
        [jnp.asarray(logits, jnp.float32)],
        [jnp.asarray(np.where(np.arange(length)[:, None] == 3, np.eye(4)[0], target), jnp.float32)],
        jnp.array([6]),
        block_size=block_size,
        slice_ratio=0.5,
        scale=10.0,
    )
    np.testing.assert_allclose(per_layer, [2 * np.log(2.0) / 3], rtol=1e-6)


def test_decode_kl_loss_matches_numpy_over_ragged_rows():
    """Random gate logits and targets, two layers, ragged rows: the mean over counted (b, k, t) of the row KL."""
    rng = np.random.default_rng(2)
    batch, heads, length, block_size, ratio = 3, 2, 40, 4, 0.3
    lengths = np.array([40, 25, 9])
    num_blocks = length // block_size
    completed = np.arange(num_blocks)[None, :] < (np.arange(length) // block_size)[:, None]  # [T, J]
    logits, targets, expected = [], [], []
    for _ in range(2):
        raw = rng.standard_normal((batch, heads, length, num_blocks)) * 2
        layer_logits = _decode_logits(raw, block_size)
        target = np.where(completed, rng.random(raw.shape) ** 3, 0.0)
        total = target.sum(-1, keepdims=True)
        target = np.where(total > 0, target / np.where(total > 0, total, 1), 0.0)
        log_q = layer_logits - layer_logits.max(-1, keepdims=True)
        log_q = log_q - np.log(np.exp(log_q).sum(-1, keepdims=True))
        row_kl = np.where(target > 0, target * (np.log(np.where(target > 0, target, 1)) - log_q), 0).sum(-1)
        kl = [
            row_kl[b, :, t]
            for b in range(batch)
            for t in range(length)
            if max(block_size, int(lengths[b] * ratio)) <= t < lengths[b]
        ]
        expected.append(np.mean(kl))
        logits.append(jnp.asarray(layer_logits, jnp.float32))
        targets.append(jnp.asarray(target, jnp.float32))
    loss, per_layer = decode_gate_kl_loss(
        logits, targets, jnp.asarray(lengths), block_size=block_size, slice_ratio=ratio, scale=10.0
    )
    np.testing.assert_allclose(per_layer, expected, rtol=1e-5)
    np.testing.assert_allclose(loss, 10.0 * sum(expected), rtol=1e-5)
