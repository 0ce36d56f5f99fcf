"""What the kernel tests share: the implementation × shape cases, tolerances, inputs, poisoning, comparisons."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.inputs import input_key
from pallas_kernels.shapes import GPU_TEST_SHAPES, TEST_SHAPES

IMPLEMENTATIONS = ["reference", pytest.param("mosaic", marks=pytest.mark.gpu)]

# The references run in float32 on CPU (checked tightly against float64); the kernels get bf16, as in the model.
DTYPES = {"reference": jnp.float32, "mosaic": jnp.bfloat16}
TOLERANCES = {np.dtype(jnp.float32): 1e-4, np.dtype(jnp.bfloat16): 1e-2}

# Up to this length the expected values come from the float64 NumPy oracle; above it (GPU only) from the jnp
# reference on the device, itself checked against the oracle up to here.
ORACLE_MAX_SEQ_LEN = 4096


# The float64 oracle costs seconds per case at 4096 on CPU: there the reference runs a subset of the patterns.
LONG_REFERENCE_PATTERNS = ("dense", "sparse90", "empty_rows")


def implementation_cases(shapes=TEST_SHAPES, gpu_shapes=GPU_TEST_SHAPES, patterns=None) -> list:
    """pytest params (implementation, shape[, pattern]): each implementation on `shapes`, the kernel on `gpu_shapes`.

    With `patterns`, one case per pattern too (the reference at ORACLE_MAX_SEQ_LEN runs LONG_REFERENCE_PATTERNS).
    """
    cases = []
    runs = [("reference", shape) for shape in shapes] + [("mosaic", shape) for shape in (*shapes, *gpu_shapes)]
    for implementation, shape in runs:
        marks = [pytest.mark.gpu] if implementation == "mosaic" else []
        name = f"{implementation}-{shape.name}"
        if patterns is None:
            cases.append(pytest.param(implementation, shape, id=name, marks=marks))
            continue
        for pattern in patterns:
            long_reference = implementation == "reference" and shape.seq_len >= ORACLE_MAX_SEQ_LEN
            if not long_reference or pattern in LONG_REFERENCE_PATTERNS:
                cases.append(pytest.param(implementation, shape, pattern, id=f"{name}-{pattern}", marks=marks))
    return cases


def case_key(request: pytest.FixtureRequest) -> jax.Array:
    """A PRNG key of its own for each test case (fresh inputs per case, reproducible across runs)."""
    return input_key(zlib.crc32(request.node.nodeid.encode()))


def poison_device_memory(outputs) -> None:
    """Fill freed device memory with NaN, so that output elements a kernel forgets to write show up as NaN.

    `outputs` is a pytree of `jax.ShapeDtypeStruct` (e.g. from `jax.eval_shape` of the call about to be made): one
    NaN array of each shape and dtype is allocated and freed. XLA's allocator tends to hand such freed blocks to the
    next outputs of the same size; best effort, effective on GPU, harmless on CPU.
    """
    for output in jax.tree.leaves(outputs):
        jnp.full(output.shape, jnp.nan, output.dtype).block_until_ready().delete()


def relative_error(actual, expected) -> float:
    """max |actual − expected| / max |expected| (max-abs, so one bad row is not averaged away)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = np.abs(expected).max()
    return float(np.abs(actual - expected).max() / (scale if scale > 0 else 1.0))


def assert_close(actual, expected, tolerance: float, name: str) -> None:
    actual = np.asarray(jnp.asarray(actual).astype(jnp.float32))
    assert actual.shape == np.shape(expected), f"{name}: shape {actual.shape} != {np.shape(expected)}"
    assert np.isfinite(actual).all(), f"{name}: {np.size(actual) - np.isfinite(actual).sum()} non-finite values"
    error = relative_error(actual, expected)
    assert error <= tolerance, f"{name}: relative error {error:.3g} > {tolerance}"


def assert_lse_close(actual, expected, tolerance: float) -> None:
    """lse: -inf exactly where expected (empty rows), elsewhere within `tolerance` absolute (lse is O(1..10))."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == np.float32, f"lse dtype {actual.dtype}, expected float32"
    assert actual.shape == expected.shape, f"lse: shape {actual.shape} != {expected.shape}"
    empty = np.isneginf(expected)
    np.testing.assert_array_equal(np.isneginf(actual), empty, err_msg="lse: -inf rows differ from empty rows")
    assert np.isfinite(actual[~empty]).all(), "lse: non-finite values on non-empty rows"
    error = np.abs(actual[~empty] - expected[~empty]).max(initial=0.0)
    assert error <= tolerance, f"lse: absolute error {error:.3g} > {tolerance}"
