"""attention_with_pooling: one test body per property, run against every implementation (reference on CPU,
the Mosaic GPU kernel on the H200 via the `gpu` marker)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention_with_pooling import (
    attention_with_pooling,
    attention_with_pooling_implementation,
    kernel_sm90,
)
from pallas_kernels.dispatch import hopper_available
from pallas_kernels.inputs import input_key, random_qkv
from pallas_kernels.shapes import TEST_SHAPES, AttentionShape
from tests.pallas_kernels import harness, oracle

SHAPES = {shape.name: shape for shape in TEST_SHAPES}


def _expected(q, k, v, sm_scale, block_size):
    if q.shape[1] <= harness.ORACLE_MAX_SEQ_LEN:
        return oracle.pooled_attention(q, k, v, sm_scale=sm_scale, block_size=block_size)
    out, pooled, lse = attention_with_pooling(
        q, k, v, sm_scale=sm_scale, block_size=block_size, return_lse=True, implementation="reference"
    )
    return np.asarray(out.astype(jnp.float32)), np.asarray(pooled), np.asarray(lse)


@pytest.mark.parametrize(("implementation", "shape"), harness.implementation_cases())
def test_matches_dense_pooled_attention(request, implementation, shape):
    q, k, v = random_qkv(harness.case_key(request), shape, harness.DTYPES[implementation])
    num_blocks = shape.num_blocks()

    def attend():
        return attention_with_pooling(q, k, v, return_lse=True, implementation=implementation)

    harness.poison_device_memory(jax.eval_shape(attend))
    out, pooled, lse = attend()
    expected_out, expected_pooled, expected_lse = _expected(q, k, v, shape.head_dim**-0.5, 64)
    assert out.dtype == q.dtype
    assert pooled.dtype == jnp.float32
    tolerance = harness.TOLERANCES[q.dtype]
    harness.assert_close(out, expected_out, tolerance, "out")
    harness.assert_close(pooled, expected_pooled, tolerance, "pooled")
    harness.assert_lse_close(lse, expected_lse, tolerance)
    np.testing.assert_allclose(np.asarray(pooled).sum(axis=-1), 1.0, rtol=1e-5)
    assert not np.asarray(pooled)[..., ~np.tri(num_blocks, dtype=bool)].any(), "pooled is nonzero above the diagonal"


@pytest.mark.parametrize("implementation", harness.IMPLEMENTATIONS)
def test_block_size_scale_and_no_lse(request, implementation):
    """A non-default block size and softmax scale; without return_lse the op returns (out, pooled)."""
    shape = AttentionShape(name="g2_h64_t100", batch=1, seq_len=100, num_q_heads=4, num_kv_heads=2, head_dim=64)
    q, k, v = random_qkv(harness.case_key(request), shape, harness.DTYPES[implementation])
    try:
        result = attention_with_pooling(q, k, v, sm_scale=0.1, block_size=32, implementation=implementation)
    except NotImplementedError:
        pytest.skip("the kernel supports block_size 64 only")
    assert len(result) == 2
    expected_out, expected_pooled, _ = oracle.pooled_attention(q, k, v, sm_scale=0.1, block_size=32)
    tolerance = harness.TOLERANCES[q.dtype]
    harness.assert_close(result[0], expected_out, tolerance, "out")
    harness.assert_close(result[1], expected_pooled, tolerance, "pooled")


def test_pooled_map_is_not_trivial(request):
    """The test inputs make attention peaky: the pooled rows are far from uniform over their causal blocks."""
    shape = SHAPES["g4_h64_t1000"]
    q, k, v = random_qkv(harness.case_key(request), shape, jnp.float32)
    _, pooled = attention_with_pooling(q, k, v, implementation="reference")
    last_row = np.asarray(pooled)[..., -1, :]  # [B, N, J]: 16 causal blocks, uniform would be 1/16 each
    assert last_row.max() > 2 / shape.num_blocks()
    assert last_row.min() < 0.5 / shape.num_blocks()


def _bad_arguments():
    shape = SHAPES["g4_h128_t63"]
    q, k, v = random_qkv(input_key(0), shape, jnp.float32)  # 4 query heads, 1 kv head
    k2 = jnp.concatenate([k, k], axis=2)  # 2 kv heads
    return [
        pytest.param(dict(q=q[0], k=k, v=v), "rank 4", id="rank"),
        pytest.param(dict(q=q, k=k, v=v[..., :64]), "same shape", id="kv-shape"),
        pytest.param(dict(q=q[:1], k=k, v=v), "batch", id="batch"),
        pytest.param(dict(q=q[..., :64], k=k, v=v), "head_dim", id="head-dim"),
        pytest.param(dict(q=q, k=k[:, :-1], v=v[:, :-1]), "T == S", id="length"),
        pytest.param(dict(q=q[:, :, :3], k=k2, v=k2), "multiple of", id="heads"),
        pytest.param(dict(q=q, k=k, v=v.astype(jnp.float16)), "same dtype", id="dtype"),
        pytest.param(dict(q=q.astype(jnp.int32), k=k.astype(jnp.int32), v=v.astype(jnp.int32)), "floating", id="int"),
        pytest.param(dict(q=q, k=k, v=v, block_size=0), "block_size", id="block-size"),
        pytest.param(dict(q=q, k=k, v=v, implementation="cudnn"), "implementation", id="impl"),
    ]


@pytest.mark.parametrize(("arguments", "message"), _bad_arguments())
def test_bad_arguments_raise_value_error(arguments, message):
    with pytest.raises(ValueError, match=message):
        attention_with_pooling(**arguments)
    with pytest.raises(ValueError, match=message):
        attention_with_pooling_implementation(**arguments)


@pytest.mark.skipif(hopper_available(), reason="off Hopper only: checks the fallback to the reference")
def test_dispatch_off_hopper():
    shape = SHAPES["g4_h128_t63"]
    q, k, v = random_qkv(input_key(0), shape, jnp.bfloat16)
    assert attention_with_pooling_implementation(q, k, v) == "reference"
    with pytest.raises(NotImplementedError):
        attention_with_pooling_implementation(q, k, v, implementation="mosaic")
    with pytest.raises(NotImplementedError):
        attention_with_pooling(q, k, v, implementation="mosaic")


def test_chunk_rows():
    """Chunks of query rows: whole 128-row tiles whose f32 [B, N, Jc, rows] row-maxima buffer fits the budget, Jc =
    Tp / 64 padded to 64; all rows when they fit; at least one tile whatever the budget."""
    budget = kernel_sm90.DEFAULT_CONFIG.max_chunk_bytes
    assert kernel_sm90.chunk_rows((1, 32768, 32, 128), budget) == 32768  # 2 GiB: one chunk
    assert kernel_sm90.chunk_rows((1, 131072, 32, 128), budget) == 16384  # 4·32·2048 B per row
    assert kernel_sm90.chunk_rows((2, 1000, 4, 64), 2048 * 300) == 256  # 2048 B per row, Tp = 1024
    assert kernel_sm90.chunk_rows((2, 1000, 4, 64), 1) == 128
    with pytest.raises(ValueError, match="max_chunk_bytes"):
        kernel_sm90.Config(max_chunk_bytes=0)


@pytest.mark.gpu
@pytest.mark.parametrize("seq_len", [1000, 4096])
def test_one_chunk_and_row_chunks_agree(request, seq_len):
    """The kernel in one chunk and in uneven 896-row chunks matches the oracle, and the two agree to fp32 rounding
    (the same kernel arithmetic per tile; each chunk is its own kernel instance)."""
    shape = AttentionShape(name="g4_h128", batch=2, seq_len=seq_len, num_q_heads=8, num_kv_heads=2, head_dim=128)
    q, k, v = random_qkv(harness.case_key(request), shape, jnp.bfloat16)
    scale = shape.head_dim**-0.5
    bytes_per_row = 4 * shape.batch * shape.num_q_heads * 64  # Jc = 64 at these lengths
    configs = {
        "one chunk": kernel_sm90.DEFAULT_CONFIG,
        "896-row chunks": kernel_sm90.Config(max_chunk_bytes=1000 * bytes_per_row),
    }
    assert kernel_sm90.chunk_rows(q.shape, configs["896-row chunks"].max_chunk_bytes) == 896
    results = {
        name: kernel_sm90.attention_with_pooling_sm90(
            q, k, v, sm_scale=scale, block_size=64, return_lse=True, config=config
        )
        for name, config in configs.items()
    }
    expected_out, expected_pooled, expected_lse = _expected(q, k, v, scale, 64)
    tolerance = harness.TOLERANCES[q.dtype]
    for name, (out, pooled, lse) in results.items():
        harness.assert_close(out, expected_out, tolerance, f"{name}: out")
        harness.assert_close(pooled, expected_pooled, tolerance, f"{name}: pooled")
        harness.assert_lse_close(lse, expected_lse, tolerance)
        for got, want in zip((out, pooled, lse), results["one chunk"], strict=True):
            np.testing.assert_allclose(
                np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-6, err_msg=name
            )
