"""block_topk_mask: every implementation against a numpy oracle (stable sort of each row's causal scores).

The Pallas Triton kernel runs on CPU through Pallas' interpreter ("interpret"), and compiled on the GPU ("triton").
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_topk import block_topk_mask, block_topk_mask_implementation, reference
from pallas_kernels.block_topk.kernel_triton import Config, default_config, topk_mask_triton
from pallas_kernels.inputs import input_key

IMPLEMENTATIONS = ["reference", "interpret", pytest.param("triton", marks=pytest.mark.gpu)]


def _oracle(scores: np.ndarray, k: int) -> np.ndarray:
    """For each row i: the first min(k, causal) columns of a stable descending sort of the causal scores."""
    *leading, num_q_blocks, num_kv_blocks = scores.shape
    mask = np.zeros(scores.shape, bool)
    for index in itertools.product(*map(range, leading)):
        for i in range(num_q_blocks):
            causal = min(i + 1, num_kv_blocks)
            order = np.argsort(-scores[(*index, i)][:causal].astype(np.float64), kind="stable")
            mask[(*index, i, order[: min(k, causal)])] = True
    return mask


def _run(implementation: str, scores: jax.Array, k: int) -> np.ndarray:
    if implementation == "interpret":
        return np.asarray(topk_mask_triton(scores, k, interpret=True))
    return np.asarray(block_topk_mask(scores, k, implementation=implementation))


def _scores(seed: int, shape, dtype, *, ties: bool) -> jax.Array:
    """Fresh normal scores; with `ties`, rounded to quarters (many equal values per row). Shifted off zero:
    top_k orders -0.0 below +0.0, the oracle's float64 sort treats them as equal."""
    scores = jax.random.normal(input_key(seed), shape, jnp.float32) * 3
    if ties:
        scores = jnp.round(scores * 4) / 4 + 50.0
    return scores.astype(dtype)


CASES = [  # (shape [..., I, J], k, dtype, ties)
    ((1, 2, 37, 37), 5, jnp.bfloat16, True),  # short rows keep everything; bf16 ties
    ((2, 1, 64, 64), 13, jnp.float32, False),
    ((1, 3, 40, 50), 7, jnp.float32, True),  # I < J: columns beyond the last row's diagonal never chosen
    ((1, 2, 33, 20), 40, jnp.bfloat16, True),  # I > J and k > J: every causal block
    ((1, 1, 130, 130), 1, jnp.float16, True),  # k = 1: only the first maximum
    ((3, 70, 70), 20, jnp.float32, True),  # any leading axes
]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-k{c[1]}-{jnp.dtype(c[2]).name}-ties{c[3]}")
def test_topk_mask_matches_stable_sort_oracle(implementation, case):
    shape, k, dtype, ties = case
    scores = _scores(len(shape) + shape[-1] + k, shape, dtype, ties=ties)
    mask = _run(implementation, scores, k)
    assert mask.dtype == bool and mask.shape == shape
    np.testing.assert_array_equal(mask, _oracle(np.asarray(scores.astype(jnp.float32)), k))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_topk_mask_orders_negative_and_infinite_scores(implementation):
    """Negative scores (the flipped-key half) and -inf scores inside the causal triangle are still ranked, and
    ranked above nothing: a row of -inf keeps its first k blocks."""
    scores = -jnp.abs(_scores(3, (1, 2, 24, 24), jnp.float32, ties=False)) - 1.0
    scores = scores.at[0, 1].set(-jnp.inf)
    mask = _run(implementation, scores, 6)
    np.testing.assert_array_equal(mask, _oracle(np.asarray(scores), 6))
    assert mask[0, 1, 23, :6].all() and not mask[0, 1, 23, 6:].any()


@pytest.mark.gpu
def test_topk_mask_kernel_at_128k_tokens():
    """The prefill size that motivated the kernel (I = J = 2048, k = 10% of J), four heads, against the reference."""
    scores = _scores(4, (1, 4, 2048, 2048), jnp.bfloat16, ties=True)
    assert block_topk_mask_implementation(scores, 204) == "triton"
    np.testing.assert_array_equal(
        np.asarray(block_topk_mask(scores, 204)), np.asarray(block_topk_mask(scores, 204, implementation="reference"))
    )


def test_row_bands_cover_every_row_once():
    assert reference.row_bands(100) == [(0, 100)]
    assert reference.row_bands(600) == [(0, 256), (256, 512), (512, 600)]
    bands = reference.row_bands(4100)  # long sequences: at most 8 bands
    assert len(bands) == 8 and bands[0] == (0, 513) and bands[-1][1] == 4100
    assert all(stop == next_start for (_, stop), (next_start, _) in itertools.pairwise(bands))


def test_config_and_arguments_are_checked():
    assert default_config(2048) == Config(rows_per_program=4, num_warps=8)
    assert default_config(16) == Config(rows_per_program=16, num_warps=4)
    with pytest.raises(ValueError, match="power of two"):
        Config(rows_per_program=3, num_warps=4)
    with pytest.raises(ValueError, match="num_warps"):
        Config(rows_per_program=4, num_warps=3)
    scores = jnp.ones((1, 1, 8, 8))
    with pytest.raises(ValueError, match="positive int"):
        block_topk_mask(scores, 0)
    with pytest.raises(ValueError, match=r"\[\.\.\., I, J\]"):
        block_topk_mask(jnp.ones((8,)), 2)
    with pytest.raises(ValueError, match="'triton' \\(this op's Pallas Triton kernel\\)"):
        block_topk_mask(scores, 2, implementation="mosaic")  # the kernel is not Mosaic GPU: names say what runs
    with pytest.raises(NotImplementedError, match="float16/bfloat16/float32"):
        topk_mask_triton(scores.astype(jnp.int32), 2, interpret=True)
    with pytest.raises(NotImplementedError, match="key blocks per row"):
        topk_mask_triton(jax.ShapeDtypeStruct((1, 40000), jnp.float32), 2, interpret=True)


def test_auto_dispatch_uses_the_reference_without_a_hopper_gpu():
    if jax.devices()[0].platform == "gpu":
        pytest.skip("this machine has a GPU: auto-dispatch picks the kernel")
    assert block_topk_mask_implementation(jnp.ones((1, 1, 8, 8)), 2) == "reference"
