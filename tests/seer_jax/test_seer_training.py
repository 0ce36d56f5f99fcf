"""SeerAttention fine-tuning forward: sparse logits and gradients, gate targets, gradient routing."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from seer_jax.forwards import distillation_inputs, sparse_training_forward
from seer_jax.gate import GateConfig, GateParam
from seer_jax.model import CausalLM
from seer_jax.seer import SeerConfig, seer_from_base
from seer_jax.sparsity import Selection
from tests.seer_jax.test_seer import GATE, base_model, seer_model
from tests.seer_jax.tiny_models import TINY, hopper_base_model, random_tokens

LENGTH = 256  # 4 full blocks: training rows are packed, never padded
BASE_PARAMS = nnx.All(nnx.Param, nnx.Not(GateParam))


def _lm_loss(logits, tokens):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), tokens[:, 1:]).mean()


def test_every_block_kept_matches_the_dense_model_in_logits_and_gradients():
    tokens = jnp.asarray(random_tokens(3, 2, LENGTH))
    seer = seer_model(SeerConfig(gate=GATE, selection=Selection(nz_ratio=1.0)))

    def seer_loss(model):
        return _lm_loss(sparse_training_forward(model, tokens)[0], tokens)

    def dense_loss(model: CausalLM):
        return _lm_loss(model(tokens)[0], tokens)

    # Compiled: op by op each gradient takes most of a minute on CPU.
    seer_value, seer_grads = nnx.jit(nnx.value_and_grad(seer_loss, argnums=nnx.DiffState(0, BASE_PARAMS)))(seer)
    dense_value, dense_grads = nnx.jit(nnx.value_and_grad(dense_loss))(base_model())
    np.testing.assert_allclose(seer_value, dense_value, rtol=1e-5)
    seer_flat = dict(nnx.to_flat_state(seer_grads))
    for path, grad in nnx.to_flat_state(dense_grads):
        want = grad.get_value()  # atol scaled as tests/train/test_sharded_training.py: fused sums round differently
        np.testing.assert_allclose(seer_flat[path].get_value(), want, rtol=2e-4, atol=1e-5 * np.abs(want).max())


def training_loss(model, tokens, remat=False):
    """LM loss plus a squared error of the gate logits against their pooled targets: every parameter, gates
    included, gets a gradient (a stand-in for the fine-tuning loss that needs no `train` import)."""
    logits, gate_logits, targets = sparse_training_forward(model, tokens, remat=remat)
    # masked (above-diagonal) gate logits are -inf: compare the causal ones only
    pairs = zip(gate_logits, targets, strict=True)
    gate = sum(jnp.mean(jnp.where(lg > -1e8, lg - tg, 0.0) ** 2) for lg, tg in pairs)
    return _lm_loss(logits, tokens) + gate


def test_remat_gives_the_same_loss_and_gradients():
    tokens = jnp.asarray(random_tokens(6, 2, LENGTH))
    seer = seer_model(SeerConfig(gate=GATE, selection=Selection(nz_ratio=0.5)))

    grad_fn = nnx.jit(nnx.value_and_grad(training_loss, argnums=nnx.DiffState(0, nnx.Param)), static_argnums=2)
    value, grads = grad_fn(seer, tokens, False)
    remat_value, remat_grads = grad_fn(seer, tokens, True)
    assert np.isfinite(value)
    np.testing.assert_allclose(remat_value, value, rtol=1e-6)
    flat = dict(nnx.to_flat_state(grads))
    assert any(isinstance(v, GateParam) for v in flat.values())  # the gates' gradients are compared too
    for path, grad in nnx.to_flat_state(remat_grads):
        np.testing.assert_allclose(grad.get_value(), flat[path].get_value(), rtol=1e-5, atol=1e-8)


def test_targets_equal_distillation_inputs_and_lm_loss_never_reaches_the_gates():
    tokens = jnp.asarray(random_tokens(4, 2, LENGTH))
    seer = seer_model(SeerConfig(gate=GATE, selection=Selection(nz_ratio=0.3)))
    logits, gate_logits, targets = sparse_training_forward(seer, tokens)
    assert logits.shape == (2, LENGTH, TINY.vocab_size) and np.isfinite(np.asarray(logits)).all()
    assert len(gate_logits) == len(targets) == TINY.num_layers
    # Layer 0 sees the same input as in the dense distillation forward; later layers see sparse-attention outputs.
    _, expected_targets = distillation_inputs(seer_model(SeerConfig(gate=GATE)), tokens)  # the same gates, dense
    np.testing.assert_allclose(targets[0], expected_targets[0], rtol=1e-5, atol=1e-7)
    assert not np.allclose(targets[1], expected_targets[1], rtol=1e-3)

    def lm_only(model):
        return _lm_loss(sparse_training_forward(model, tokens)[0], tokens)

    gate_grads = nnx.grad(lm_only, argnums=nnx.DiffState(0, GateParam))(seer)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(gate_grads))

    def gate_only(model):
        return sum(jnp.mean(lg[lg > -1e8] ** 2) for lg in sparse_training_forward(model, tokens)[1])

    base_grads = nnx.grad(gate_only, argnums=nnx.DiffState(0, BASE_PARAMS))(seer)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(base_grads))


@pytest.mark.gpu
def test_mosaic_kernels_train_with_and_without_remat():
    """On Hopper (bf16, head_dim 128) the training forward runs the Mosaic kernels (block-sparse forward and backward,
    pooling under stop_gradient): with every block kept its loss equals the dense cuDNN model's, and gradients of a
    sparse model are finite and the same with per-layer remat."""
    base = hopper_base_model()
    tokens = jnp.asarray(random_tokens(7, 2, 512))
    gate = GateConfig(hidden_size=128)
    every_block = seer_from_base(base, SeerConfig(gate=gate, selection=Selection(nz_ratio=1.0)), rngs=nnx.Rngs(1))
    dense_loss = nnx.jit(lambda model: _lm_loss(model(tokens)[0], tokens))(base)
    lm_only = nnx.jit(lambda model: _lm_loss(sparse_training_forward(model, tokens)[0], tokens))(every_block)
    np.testing.assert_allclose(float(lm_only), float(dense_loss), rtol=1e-2)

    sparse = seer_from_base(base, SeerConfig(gate=gate, selection=Selection(nz_ratio=0.3)), rngs=nnx.Rngs(1))
    grad_fn = nnx.jit(nnx.value_and_grad(training_loss, argnums=nnx.DiffState(0, nnx.Param)), static_argnums=2)
    value, grads = grad_fn(sparse, tokens, False)
    remat_value, remat_grads = grad_fn(sparse, tokens, True)
    np.testing.assert_allclose(float(remat_value), float(value), rtol=1e-3)
    flat = dict(nnx.to_flat_state(grads))
    for path, grad in nnx.to_flat_state(remat_grads):
        reference = np.asarray(flat[path].get_value(), np.float32)
        assert np.isfinite(reference).all(), path
        error = np.abs(np.asarray(grad.get_value(), np.float32) - reference).max()
        assert error <= 2e-2 * np.abs(reference).max() + 1e-6, path
