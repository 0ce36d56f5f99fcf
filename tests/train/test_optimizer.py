"""Learning-rate schedules, weight-decay mask and clipping of `train.optimizer`."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train.optimizer import OptimizerConfig, build_optimizer, learning_rate_schedule


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_warmup_then_decay(schedule):
    config = OptimizerConfig(learning_rate=1e-3, warmup_steps=4, schedule=schedule, min_learning_rate=1e-4)
    rates = np.array([float(learning_rate_schedule(config, 20)(step)) for step in range(21)])
    np.testing.assert_allclose(rates[:5], [0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3], rtol=1e-6)  # step 0 uses rate 0, as HF
    if schedule == "constant":
        np.testing.assert_allclose(rates[4:], 1e-3, rtol=1e-6)
    else:
        assert np.all(np.diff(rates[4:]) < 0)
        assert rates[20] == pytest.approx(1e-4, rel=1e-5)
    if schedule == "linear":
        np.testing.assert_allclose(rates[12], (1e-3 + 1e-4) / 2, rtol=1e-5)
    if schedule == "cosine":
        np.testing.assert_allclose(rates[12], 1e-4 + (1e-3 - 1e-4) * 0.5, rtol=1e-5)


def test_weight_decay_skips_vectors_and_clipping_bounds_the_gradient():
    # beta1 = beta2 = 0 and epsilon = 1: Adam's update is -lr * g / (|g| + 1) (+ the decay), elementwise.
    config = OptimizerConfig(learning_rate=0.1, weight_decay=0.5, beta1=0.0, beta2=0.0, epsilon=1.0)
    optimizer, _ = build_optimizer(config, total_steps=10)
    rng = np.random.default_rng(0)
    params = {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "scale": jnp.asarray(rng.normal(size=4))}
    state = optimizer.init(params)

    # Zero gradients: only weight decay moves the parameters, the matrix but never the norm scale.
    updates, _ = optimizer.update(jax.tree.map(jnp.zeros_like, params), state, params)
    np.testing.assert_allclose(updates["kernel"], -0.1 * 0.5 * params["kernel"], rtol=1e-6)
    np.testing.assert_array_equal(updates["scale"], 0.0)

    # Gradients of 1e6 in all 16 elements are clipped to global norm 1 (0.25 each) before Adam.
    huge = jax.tree.map(lambda p: jnp.full_like(p, 1e6), params)
    no_decay, _ = build_optimizer(dataclasses.replace(config, weight_decay=0.0), total_steps=10)
    updates, _ = no_decay.update(huge, no_decay.init(params), params)
    for update in jax.tree.leaves(updates):
        np.testing.assert_allclose(update, -0.1 * 0.25 / 1.25, rtol=1e-5)
    unclipped, _ = build_optimizer(dataclasses.replace(config, weight_decay=0.0, grad_clip_norm=None), 10)
    updates, _ = unclipped.update(huge, unclipped.init(params), params)
    np.testing.assert_allclose(updates["scale"], -0.1, rtol=1e-5)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"schedule": "step"}, "schedule"),
        ({"min_learning_rate": 1.0}, "min_learning_rate"),
        ({"beta2": 1.0}, "beta2"),
        ({"grad_clip_norm": 0.0}, "grad_clip_norm"),
        ({"warmup_steps": -1}, "warmup_steps"),
    ],
)
def test_invalid_settings_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        OptimizerConfig(**{"learning_rate": 1e-3, **changes})
    with pytest.raises(ValueError, match="total_steps"):
        learning_rate_schedule(OptimizerConfig(learning_rate=1e-3, warmup_steps=10), 10)
