"""The causal-LM loss: its value against a direct computation, and remat's gradients against plain autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tests.train.tiny import VOCAB, tiny_model
from train.lm_loss import evaluate_loss, next_token_loss


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
