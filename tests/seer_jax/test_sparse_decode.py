"""Sparse decoding through `generate`: a budget covering the context equals dense generation token for token; small
budgets change tokens but stay finite and match teacher-forced decoding; left-padded rows decode as alone; the
decode density report; a per-layer allocation gives each layer its own budget; prefill dense or sparse × decode
dense or sparse under jit."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels.block_sparse_decode import block_sparse_decode_implementation
from pallas_kernels.block_sparse_decode.reference import selected_block_mask
from seer_jax.decode_config import DecodeAllocation, DecodeConfig
from seer_jax.decode_selection import decode_key_mask
from seer_jax.forwards import decode_logits_and_density
from seer_jax.gate import GateConfig
from seer_jax.generate import generate
from seer_jax.seer import SeerAttention, seer_from_base
from seer_jax.seer_config import SeerConfig
from tests.seer_jax.decode_models import (
    DECODE,
    DECODE_BLOCK,
    DENSE_PREFILL,
    SPARSE_PREFILL,
    base_model,
    decode_model,
    padded_batch,
    with_decode,
)
from tests.seer_jax.tiny_models import HOPPER_TINY, TINY, hopper_base_model

PROMPT, NEW = 40, 30  # rows of 40 and 27 real tokens; 30 new tokens cross two block boundaries in each row
# One block chosen by top-k, no sink: every step of layer 1 attends 1 or 2 blocks of up to 5, so generation changes;
# layer 0 decodes densely. (One model for several tests: their compiled `generate` is shared.)
SMALL = with_decode(token_budget=DECODE_BLOCK, force_sink=False, start_layer=1)
decode_logits_and_density = nnx.jit(decode_logits_and_density)


def greedy(model, tokens, mask, new_tokens: int = NEW) -> np.ndarray:
    return np.asarray(generate(model, tokens, mask, max_new_tokens=new_tokens, eos_token_id=()))


@pytest.mark.parametrize(
    "decode,padded",
    [
        (DECODE, True),
        (with_decode(method="threshold", threshold=0.0, sliding_window=20), False),
        (with_decode(quest_weight=0.5), True),
    ],
    ids=["budget-left-padded", "threshold-unpadded", "gate+quest-left-padded"],
)
def test_full_budget_generation_equals_dense(decode, padded):
    """Every block selected (GQA, one unpadded and one left-padded row; or no padding and no mask): the greedy
    tokens are the dense model's, and the density report says 1."""
    tokens, mask = padded_batch(PROMPT, (0, 13) if padded else (0, 0))
    mask = mask if padded else None
    dense = greedy(base_model(), tokens, mask)
    sparse = greedy(decode_model(decode), tokens, mask)
    np.testing.assert_array_equal(sparse, dense)
    if padded:
        _, density = decode_logits_and_density(decode_model(decode), tokens, mask, jnp.asarray(sparse))
        np.testing.assert_array_equal(np.asarray(density), 1.0)


def expected_density(prompt_lengths: np.ndarray, new_tokens: int, chosen: int) -> float:
    """Density of a top-k of `chosen` blocks + the current block, no sink, no window: per step and row,
    min(chosen, c) + 1 of c + 1 blocks, c the current block (every kv head alike)."""
    lengths = prompt_lengths[:, None] + 1 + np.arange(new_tokens - 1)[None, :]  # [B, steps] with the fed token
    current = (lengths - 1) // DECODE_BLOCK
    return float(np.sum(np.minimum(chosen, current) + 1) / np.sum(current + 1))


def test_small_budget_generation_is_teacher_forced_decoding():
    """A one-block budget changes the tokens; they are finite-logit argmaxes of teacher-forced sparse decoding of
    themselves, whose density report matches the block count; layers below start_layer decode densely."""
    tokens, mask = padded_batch(PROMPT)
    model = decode_model(SMALL)
    generated = greedy(model, tokens, mask)
    assert (generated != greedy(base_model(), tokens, mask)).any()
    logits, density = decode_logits_and_density(model, tokens, mask, jnp.asarray(generated))
    logits = np.asarray(logits)
    assert logits.shape == (2, NEW, TINY.vocab_size) and np.isfinite(logits).all()
    np.testing.assert_array_equal(np.argmax(logits, axis=-1), generated)
    expected = expected_density(np.asarray([PROMPT, PROMPT - 13]), NEW, chosen=1)
    np.testing.assert_allclose(np.asarray(density), [1.0, expected], rtol=1e-6)
    assert expected < 0.75


def fraction_density(prompt_lengths: np.ndarray, new_tokens: int, fraction: float) -> float:
    """Density of a context fraction's top-k (floor(fraction · n / 16) blocks in float32) + the current block, no
    sink, no window, per step and row, n the row's tokens with the fed one."""
    lengths = prompt_lengths[:, None] + 1 + np.arange(new_tokens - 1)[None, :]  # [B, steps]
    current = (lengths - 1) // DECODE_BLOCK
    count = np.floor(np.float32(fraction) * lengths.astype(np.float32) / DECODE_BLOCK).astype(int)
    return float(np.sum(np.minimum(count, current) + 1) / np.sum(current + 1))


# A token budget of one block shared 0.25 : 1.75 at 16 / 160 = 0.1 (layer 0 no block, layer 1 two); a context
# fraction of 0.2 shared 0 : 0.6.
TOKEN_SHARES = DecodeAllocation(fractions=(0.1, 1.0), layer_fractions=((0.025, 0.175), (1.0, 1.0)), length=160)
FRACTION_SHARES = DecodeAllocation(fractions=(0.2, 1.0), layer_fractions=((0.0, 0.6), (1.0, 1.0)), length=160)


@pytest.mark.parametrize(
    ("decode", "expected"),
    [
        (
            with_decode(token_budget=DECODE_BLOCK, force_sink=False, allocation=TOKEN_SHARES),
            lambda lengths: [expected_density(lengths, NEW, 0), expected_density(lengths, NEW, 2)],
        ),
        (
            with_decode(method="context_fraction", context_fraction=0.2, force_sink=False, allocation=FRACTION_SHARES),
            lambda lengths: [expected_density(lengths, NEW, 0), fraction_density(lengths, NEW, 0.6)],
        ),
    ],
    ids=["token_budget", "context_fraction"],
)
def test_allocation_gives_each_layer_its_budget(decode, expected, monkeypatch):
    """Each layer selects with its own budget (`DecodeConfig.for_layer`): the density each layer reports is the
    block count of its own budget, and the decode kernel's block lists hold every selected block (the logits are
    those of masked dense attention over the same selection)."""
    tokens, mask = padded_batch(PROMPT)
    model = decode_model(decode)
    generated = jnp.asarray(greedy(model, tokens, mask))
    logits, density = decode_logits_and_density(model, tokens, mask, generated)
    np.testing.assert_allclose(np.asarray(density), expected(np.asarray([PROMPT, PROMPT - 13])), rtol=1e-6)
    monkeypatch.setattr(
        SeerAttention,
        "_attend_blocks",
        lambda self, q, k, v, index, count, key_mask: self._attend_selected(
            q, k, v, decode_key_mask(listed_blocks(index, count, k.shape[1], DECODE_BLOCK), key_mask, DECODE_BLOCK)
        ),
    )
    masked, _ = nnx.jit(decode_logits_and_density.__wrapped__)(model, tokens, mask, generated)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(masked), rtol=1e-5, atol=1e-5)


def listed_blocks(index: jax.Array, count: jax.Array, num_slots: int, block_size: int) -> jax.Array:
    """The decode kernel's block lists as the bool [B, K, J] selection they list (J blocks of a num_slots cache)."""
    return selected_block_mask(index, count, -(-num_slots // block_size))


def test_left_padded_row_decodes_as_alone():
    """Blocks count each row's own tokens: a left-padded row generates what it generates unpadded."""
    tokens, mask = padded_batch(PROMPT)
    model = decode_model(SMALL)
    together = greedy(model, tokens, mask)
    np.testing.assert_array_equal(together[1:], greedy(model, tokens[1:, 13:], None))


@pytest.mark.parametrize("prefill", [DENSE_PREFILL, SPARSE_PREFILL], ids=["dense-prefill", "sparse-prefill"])
@pytest.mark.parametrize("decode", [None, SMALL], ids=["dense-decode", "sparse-decode"])
def test_prefill_and_decode_combinations_under_jit(prefill, decode):
    """Block-sparse or dense prefill (prefill gates, 64-token blocks) × block-sparse or dense decode (decode gates)
    in one compiled `generate`; prompts of 3 prefill blocks."""
    tokens, mask = padded_batch(150, (0, 20))
    model = decode_model(decode, prefill)
    generated = greedy(model, tokens, mask, new_tokens=8)
    assert generated.shape == (2, 8) and ((generated >= 0) & (generated < TINY.vocab_size)).all()
    if decode is not None:  # decode sparsity does not depend on the prefill's
        _, density = decode_logits_and_density(model, tokens, mask, jnp.asarray(generated))
        expected = expected_density(np.asarray([150, 130]), 8, chosen=1)
        np.testing.assert_allclose(np.asarray(density), [1.0, expected], rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [64, 32])
def test_mosaic_decode_kernel_in_the_model(monkeypatch, block_size):
    """On Hopper (bf16, head_dim 128, 64- or 32-token blocks) sparse decode steps run the Mosaic decode kernel: with
    a budget covering the context the teacher-forced log-probs equal dense decoding's, and with a small budget
    those of the masked dense attention over the same blocks."""
    base = hopper_base_model()
    decode = DecodeConfig(hidden_size=128, block_size=block_size, qk_norm=True, token_budget=10**6)
    structure = dict(gate=GateConfig(hidden_size=128), selection=DENSE_PREFILL)
    tokens, mask = padded_batch(300, padding=(0, 77))
    continuation = jnp.asarray(np.random.default_rng(0).integers(3, HOPPER_TINY.vocab_size, (2, 40)), jnp.int32)
    q = jax.ShapeDtypeStruct((2, HOPPER_TINY.num_q_heads, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 340, HOPPER_TINY.num_kv_heads, 128), jnp.bfloat16)
    index = jax.ShapeDtypeStruct((2, HOPPER_TINY.num_kv_heads, 6), jnp.int32)
    count, lengths = jax.ShapeDtypeStruct(index.shape[:2], jnp.int32), jax.ShapeDtypeStruct((2,), jnp.int32)
    chosen = block_sparse_decode_implementation(q, kv, kv, lengths, index, count, starts=lengths, block_size=block_size)
    assert chosen == "mosaic"

    def log_probs(decode_config):
        model = seer_from_base(base, SeerConfig(decode=decode_config, **structure), rngs=nnx.Rngs(1))
        logits, density = nnx.jit(decode_logits_and_density)(model, tokens, mask, continuation)
        return np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32))), np.asarray(density)

    full, full_density = log_probs(decode)
    dense, _ = log_probs(None)
    np.testing.assert_allclose(full_density, 1.0, rtol=1e-6)  # a float32 mean of ones
    np.testing.assert_allclose(full, dense, atol=5e-2)

    small = dataclasses.replace(decode, token_budget=128)
    kernel, density = log_probs(small)
    assert float(density.max()) < 1.0
    monkeypatch.setattr(  # the same selections through the masked dense path
        SeerAttention,
        "_attend_blocks",
        lambda self, q, k, v, index, count, key_mask: self._attend_selected(
            q,
            k,
            v,
            decode_key_mask(listed_blocks(index, count, k.shape[1], small.block_size), key_mask, small.block_size),
        ),
    )
    masked, masked_density = log_probs(small)
    np.testing.assert_array_equal(density, masked_density)
    np.testing.assert_allclose(kernel, masked, atol=5e-2)
