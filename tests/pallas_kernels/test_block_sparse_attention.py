"""block_sparse_attention: one test body per property, run against every implementation (reference on CPU,
the Mosaic GPU kernel on the H200 via the `gpu` marker)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention_with_pooling import attention_with_pooling
from pallas_kernels.block_sparse_attention import (
    BlockIndex,
    block_index_from_mask,
    block_sparse_attention,
    block_sparse_attention_implementation,
    causal_block_mask,
    kernel_bwd_sm90,
    reference,
)
from pallas_kernels.dispatch import hopper_available
from pallas_kernels.inputs import BLOCK_PATTERNS, input_key, pattern_block_mask, random_qkv
from pallas_kernels.shapes import TEST_SHAPES
from tests.pallas_kernels import harness, oracle

SHAPES = {shape.name: shape for shape in TEST_SHAPES}


def _inputs(request, implementation, shape, pattern):
    qkv_key, mask_key = jax.random.split(harness.case_key(request))
    q, k, v = random_qkv(qkv_key, shape, harness.DTYPES[implementation])
    mask = pattern_block_mask(mask_key, pattern, shape.batch, shape.num_q_heads, shape.num_blocks())
    return q, k, v, mask


def _expected(q, k, v, mask, sm_scale):
    if q.shape[1] <= harness.ORACLE_MAX_SEQ_LEN:
        return oracle.dense_attention(q, k, v, sm_scale=sm_scale, block_mask=mask)
    out, lse = block_sparse_attention(
        q, k, v, block_mask=mask, sm_scale=sm_scale, return_lse=True, implementation="reference"
    )
    return np.asarray(out.astype(jnp.float32)), np.asarray(lse)


@pytest.mark.parametrize(("implementation", "shape", "pattern"), harness.implementation_cases(patterns=BLOCK_PATTERNS))
def test_matches_dense_masked_attention(request, implementation, shape, pattern):
    q, k, v, mask = _inputs(request, implementation, shape, pattern)
    sm_scale = shape.head_dim**-0.5

    def attend():
        return block_sparse_attention(q, k, v, block_mask=mask, return_lse=True, implementation=implementation)

    harness.poison_device_memory(jax.eval_shape(attend))
    out, lse = attend()
    expected_out, expected_lse = _expected(q, k, v, mask, sm_scale)
    assert out.dtype == q.dtype
    tolerance = harness.TOLERANCES[q.dtype]
    harness.assert_close(out, expected_out, tolerance, "out")
    harness.assert_lse_close(lse, expected_lse, tolerance)


@pytest.mark.parametrize("implementation", harness.IMPLEMENTATIONS)
@pytest.mark.parametrize("shape_name", ["g4_h128_t63", "g4_h64_t1000"])
def test_all_blocks_equals_dense_attention(request, implementation, shape_name):
    """Path equivalence: every causal block selected == dense causal attention (attention_with_pooling's output)."""
    shape = SHAPES[shape_name]
    q, k, v, mask = _inputs(request, implementation, shape, "dense")
    out, lse = block_sparse_attention(q, k, v, block_mask=mask, return_lse=True, implementation=implementation)
    dense_out, _, dense_lse = attention_with_pooling(q, k, v, return_lse=True, implementation=implementation)
    tolerance = harness.TOLERANCES[q.dtype]
    harness.assert_close(out, dense_out.astype(jnp.float32), tolerance, "out")
    harness.assert_lse_close(lse, np.asarray(dense_lse), tolerance)


@pytest.mark.parametrize("implementation", harness.IMPLEMENTATIONS)
def test_nothing_selected_gives_zeros_and_zero_gradients(request, implementation):
    shape = SHAPES["g1_h128_t65"]
    q, k, v, mask = _inputs(request, implementation, shape, "dense")
    mask = jnp.zeros_like(mask)

    def attend(q, k, v):
        return block_sparse_attention(q, k, v, block_mask=mask, return_lse=True, implementation=implementation)

    harness.poison_device_memory(jax.eval_shape(attend, q, k, v))
    out, lse = attend(q, k, v)
    np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)), 0.0)
    assert np.isneginf(np.asarray(lse)).all()
    grads = jax.grad(lambda *qkv: jnp.sum(attend(*qkv)[0].astype(jnp.float32)), argnums=(0, 1, 2))(q, k, v)
    for grad in grads:
        np.testing.assert_array_equal(np.asarray(grad.astype(jnp.float32)), 0.0)


@pytest.mark.parametrize("implementation", harness.IMPLEMENTATIONS)
def test_index_mask_and_upper_triangle_agree(request, implementation):
    """A BlockIndex gives the mask's result; mask entries above the diagonal change nothing; no lse by default."""
    shape = SHAPES["g4_h64_t1000"]
    q, k, v, mask = _inputs(request, implementation, shape, "half")
    upper = jax.random.bernoulli(input_key(7), 0.5, mask.shape) & ~causal_block_mask(*mask.shape[-2:])
    from_mask = block_sparse_attention(q, k, v, block_mask=mask, implementation=implementation)
    from_index = block_sparse_attention(q, k, v, index=block_index_from_mask(mask), implementation=implementation)
    from_noisy_mask = block_sparse_attention(q, k, v, block_mask=mask | upper, implementation=implementation)
    np.testing.assert_array_equal(np.asarray(from_index), np.asarray(from_mask))
    np.testing.assert_array_equal(np.asarray(from_noisy_mask), np.asarray(from_mask))


@pytest.mark.parametrize("implementation", harness.IMPLEMENTATIONS)
def test_under_jit_with_traced_index(request, implementation):
    shape = SHAPES["g1_h128_t65"]
    q, k, v, mask = _inputs(request, implementation, shape, "half")
    index = block_index_from_mask(mask)
    attend = jax.jit(lambda q, k, v, index: block_sparse_attention(q, k, v, index=index, implementation=implementation))
    np.testing.assert_array_equal(
        np.asarray(attend(q, k, v, index)),
        np.asarray(block_sparse_attention(q, k, v, index=index, implementation=implementation)),
    )


def test_reference_bfloat16_inputs(request):
    shape = SHAPES["g8_h128_t1000"]
    q, k, v, mask = _inputs(request, "mosaic", shape, "sparse90")  # bf16 inputs
    out, lse = block_sparse_attention(q, k, v, block_mask=mask, return_lse=True, implementation="reference")
    expected_out, expected_lse = oracle.dense_attention(q, k, v, sm_scale=shape.head_dim**-0.5, block_mask=mask)
    assert out.dtype == jnp.bfloat16
    harness.assert_close(out, expected_out, 1e-2, "out")
    harness.assert_lse_close(lse, expected_lse, 1e-4)


@pytest.mark.parametrize("pattern", ["dense", "half", "diagonal", "empty_rows"])
@pytest.mark.parametrize(
    ("implementation", "shape"), harness.implementation_cases([SHAPES["g1_h128_t65"], SHAPES["g4_h64_t1000"]], [])
)
def test_gradients_match_dense_masked_attention(request, implementation, shape, pattern):
    """The custom VJP (blockwise backward) against jax.grad of dense masked attention, lse cotangent included."""
    q, k, v, mask = _inputs(request, implementation, shape, pattern)
    sm_scale = 0.7 * shape.head_dim**-0.5
    out_weight_key, lse_weight_key = jax.random.split(jax.random.fold_in(harness.case_key(request), 1))
    out_weight = jax.random.normal(out_weight_key, q.shape)
    lse_weight = jax.random.normal(lse_weight_key, (shape.batch, shape.num_q_heads, shape.seq_len))

    def loss(attention, q, k, v):
        out, lse = attention(q, k, v)
        lse_term = jnp.where(jnp.isfinite(lse), lse * lse_weight, 0.0)
        return jnp.sum(out.astype(jnp.float32) * out_weight) + jnp.sum(lse_term)

    def sparse(q, k, v):
        return block_sparse_attention(
            q, k, v, block_mask=mask, sm_scale=sm_scale, return_lse=True, implementation=implementation
        )

    def dense_loss(q, k, v, allowed):
        return loss(lambda *qkv: oracle.dense_masked_attention_jnp(*qkv, allowed, sm_scale=sm_scale), q, k, v)

    grads = jax.jit(jax.grad(lambda *qkv: loss(sparse, *qkv), argnums=(0, 1, 2)))(q, k, v)
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    expected = jax.jit(jax.grad(dense_loss, argnums=(0, 1, 2)))(*up, oracle.token_mask(mask, shape.seq_len))
    tolerance = 2 * harness.TOLERANCES[q.dtype]
    for name, grad, want, primal in zip(("dq", "dk", "dv"), grads, expected, (q, k, v), strict=True):
        assert grad.dtype == primal.dtype
        harness.assert_close(grad, np.asarray(want), tolerance, name)


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", ["half", "empty_rows"])
@pytest.mark.parametrize("fused_dq", [True, False], ids=["fused_dq", "separate_dq"])
def test_both_backward_layouts_match_the_reference_backward(request, fused_dq, pattern):
    """The fused layout (dQ by TMA reduce-add, auto-dispatched up to 192k tokens) and the separate dQ kernel (longer
    sequences) each against the jnp reference backward, from the same forward outputs and cotangents."""
    shape = SHAPES["g4_h64_t1000"]
    q, k, v, mask = _inputs(request, "mosaic", shape, pattern)
    sm_scale = shape.head_dim**-0.5
    out, lse = block_sparse_attention(q, k, v, block_mask=mask, return_lse=True, implementation="mosaic")
    d_out_key, d_lse_key = jax.random.split(jax.random.fold_in(harness.case_key(request), 1))
    d_out = jax.random.normal(d_out_key, q.shape, q.dtype)
    d_lse = jnp.where(jnp.isfinite(lse), jax.random.normal(d_lse_key, lse.shape), 0.0)
    kernel = functools.partial(kernel_bwd_sm90.block_sparse_attention_bwd_sm90, sm_scale=sm_scale, fused_dq=fused_dq)
    grads = jax.jit(kernel)(q, k, v, mask, out, lse, d_out, d_lse)
    up = [x.astype(jnp.float32) for x in (q, k, v, out, d_out)]
    expected = reference.block_sparse_attention_bwd(*up[:3], mask, up[3], lse, up[4], d_lse, sm_scale=sm_scale)
    for name, grad, want in zip(("dq", "dk", "dv"), grads, expected, strict=True):
        harness.assert_close(grad, np.asarray(want), 2 * harness.TOLERANCES[q.dtype], name)


@pytest.mark.gpu
def test_fused_backward_fits_shared_memory_up_to_its_limit():
    """The fused layout compiles (its shared memory fits) at the longest sequence auto-dispatch gives it."""
    seq_len = kernel_bwd_sm90._FUSED_MAX_BLOCKS * 64
    q = jax.ShapeDtypeStruct((1, seq_len, 1, 128), jnp.bfloat16)
    mask = jax.ShapeDtypeStruct((1, 1, seq_len // 64, seq_len // 64), jnp.bool_)
    lse = jax.ShapeDtypeStruct((1, 1, seq_len), jnp.float32)
    kernel = functools.partial(kernel_bwd_sm90.block_sparse_attention_bwd_sm90, sm_scale=0.1, fused_dq=True)
    jax.jit(kernel).lower(q, q, q, mask, q, lse, q, lse).compile()


def test_gradients_without_lse_output(request):
    """With return_lse=False the VJP gets no lse cotangent: same grads as the dense reference of out alone."""
    shape = SHAPES["g4_h128_t63"]
    q, k, v, mask = _inputs(request, "reference", shape, "half")

    def sparse_loss(q, k, v):
        return jnp.sum(jnp.sin(block_sparse_attention(q, k, v, block_mask=mask, implementation="reference")))

    def dense_loss(q, k, v, allowed):
        out, _ = oracle.dense_masked_attention_jnp(q, k, v, allowed, sm_scale=shape.head_dim**-0.5)
        return jnp.sum(jnp.sin(out))

    grads = jax.grad(sparse_loss, argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(dense_loss, argnums=(0, 1, 2))(q, k, v, oracle.token_mask(mask, shape.seq_len))
    for grad, want in zip(grads, expected, strict=True):
        harness.assert_close(grad, np.asarray(want), 2e-4, "grad")


def _bad_arguments():
    shape = SHAPES["g4_h128_t63"]
    q, k, v = random_qkv(input_key(0), shape, jnp.float32)  # 4 query heads, 1 kv head
    k2 = jnp.concatenate([k, k], axis=2)  # 2 kv heads
    mask = pattern_block_mask(input_key(1), "half", shape.batch, shape.num_q_heads, 1)
    index = block_index_from_mask(mask)
    bad_index = BlockIndex(indices=index.indices, counts=index.counts + 1)
    return [
        pytest.param(dict(q=q[0], k=k, v=v, block_mask=mask), "rank 4", id="rank"),
        pytest.param(dict(q=q, k=k[:, :-1], v=v[:, :-1], block_mask=mask), "T == S", id="length"),
        pytest.param(dict(q=q[:, :, :3], k=k2, v=k2, block_mask=mask[:, :3]), "multiple of", id="heads"),
        pytest.param(dict(q=q, k=k.astype(jnp.bfloat16), v=v, block_mask=mask), "same dtype", id="dtype"),
        pytest.param(dict(q=q, k=k, v=v), "exactly one", id="no-selection"),
        pytest.param(dict(q=q, k=k, v=v, block_mask=mask, index=index), "exactly one", id="both"),
        pytest.param(dict(q=q, k=k, v=v, block_mask=mask[:, :, :, :0]), "block_mask must be", id="mask-shape"),
        pytest.param(dict(q=q, k=k, v=v, block_mask=mask.astype(jnp.int32)), "block_mask must be", id="mask-dtype"),
        pytest.param(dict(q=q, k=k, v=v, index=bad_index), "counts out of range", id="index-range"),
        pytest.param(dict(q=q, k=k, v=v, block_mask=mask, sm_scale=-1.0), "sm_scale", id="scale"),
        pytest.param(dict(q=q, k=k, v=v, block_mask=mask, implementation="triton"), "implementation", id="impl"),
    ]


@pytest.mark.parametrize(("arguments", "message"), _bad_arguments())
def test_bad_arguments_raise_value_error(arguments, message):
    with pytest.raises(ValueError, match=message):
        block_sparse_attention(**arguments)
    with pytest.raises(ValueError, match=message):
        block_sparse_attention_implementation(**arguments)


@pytest.mark.skipif(hopper_available(), reason="off Hopper only: checks the fallback to the reference")
def test_dispatch_off_hopper():
    shape = SHAPES["g4_h128_t63"]
    q, k, v = random_qkv(input_key(0), shape, jnp.bfloat16)
    mask = pattern_block_mask(input_key(1), "half", shape.batch, shape.num_q_heads, 1)
    assert block_sparse_attention_implementation(q, k, v, block_mask=mask) == "reference"
    with pytest.raises(NotImplementedError):
        block_sparse_attention_implementation(q, k, v, block_mask=mask, implementation="mosaic")
    with pytest.raises(NotImplementedError):
        block_sparse_attention(q, k, v, block_mask=mask, implementation="mosaic")
