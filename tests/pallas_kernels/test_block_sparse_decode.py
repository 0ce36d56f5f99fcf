"""block_sparse_decode: one test body per property, run against every implementation (reference on CPU, the
Mosaic GPU kernel on the H200 via the `gpu` marker). Expected values come from a float64 NumPy oracle written
from the semantics, independently of `reference`.

Rows start at per-row cache slots (`starts`, a left-padded cache): one at slot 0, one whose tokens end at the
cache's last slot (its last block runs past S when its length is not a multiple of 64), one at a random slot; the
slots outside each row's tokens hold large random values, which change the result if ever attended."""

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dispatch
from pallas_kernels.block_sparse_decode import (
    block_sparse_decode,
    block_sparse_decode_implementation,
    kernel_sm90,
)
from pallas_kernels.inputs import SCORE_STD, input_key
from tests.pallas_kernels import harness

BLOCK = 64


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeCase:
    """q [B, T, N, H], caches [B, S, K, H]; `lengths` per row; `density`: fraction of each row's valid blocks
    selected (the partial last block always is, as the model side does); `empty`: (b, k) pairs with count 0;
    `starts`: "rows" (row b starts at slot 0, at S − lengths[b] or at a random slot, as b % 3) or "zero"
    (starts=None: right-aligned)."""

    name: str
    num_queries: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    cache_len: int
    lengths: tuple[int, ...]
    density: float = 0.5
    empty: tuple[tuple[int, int], ...] = ()
    starts: str = "rows"
    block_size: int = BLOCK

    @property
    def batch(self) -> int:
        return len(self.lengths)


CASES = (
    DecodeCase(name="g1_h64_t1", num_queries=1, num_q_heads=2, num_kv_heads=2, head_dim=64, cache_len=256,
               lengths=(1, 200, 64)),
    DecodeCase(name="g4_h128_t1", num_queries=1, num_q_heads=8, num_kv_heads=2, head_dim=128, cache_len=512,
               lengths=(512, 130, 65), empty=((1, 0),)),
    DecodeCase(name="g8_h64_t1", num_queries=1, num_q_heads=8, num_kv_heads=1, head_dim=64, cache_len=1024,
               lengths=(1000, 63), density=0.3),
    DecodeCase(name="g4_h128_t4", num_queries=4, num_q_heads=8, num_kv_heads=2, head_dim=128, cache_len=512,
               lengths=(300, 3, 129)),
    DecodeCase(name="g8_h128_t8", num_queries=8, num_q_heads=8, num_kv_heads=1, head_dim=128, cache_len=256,
               lengths=(256, 70), density=0.7),
    DecodeCase(name="g1_h64_t2", num_queries=2, num_q_heads=4, num_kv_heads=4, head_dim=64, cache_len=192,
               lengths=(2, 191), empty=((0, 3), (1, 1))),
    DecodeCase(name="g4_h64_t1_s1000", num_queries=1, num_q_heads=8, num_kv_heads=2, head_dim=64, cache_len=1000,
               lengths=(999, 333, 64, 130)),
    DecodeCase(name="g4_h128_t1_right_aligned", num_queries=1, num_q_heads=4, num_kv_heads=1, head_dim=128,
               cache_len=320, lengths=(320, 77), starts="zero"),
    DecodeCase(name="g4_h128_t1_block32", num_queries=1, num_q_heads=8, num_kv_heads=2, head_dim=128, cache_len=500,
               lengths=(500, 130, 33), empty=((1, 1),), block_size=32),
    DecodeCase(name="g2_h64_t4_block32", num_queries=4, num_q_heads=4, num_kv_heads=2, head_dim=64, cache_len=256,
               lengths=(256, 3, 97), density=0.6, block_size=32),
)  # fmt: skip
GPU_CASES = (
    DecodeCase(name="llama3_8b_t32768_sparse90", num_queries=1, num_q_heads=32, num_kv_heads=8, head_dim=128,
               cache_len=32768, lengths=(32768, 20001), density=0.1),
    DecodeCase(name="g4_h64_t16384_t2_dense", num_queries=2, num_q_heads=16, num_kv_heads=4, head_dim=64,
               cache_len=16384, lengths=(16384, 9999, 1), density=1.0),
    DecodeCase(name="llama3_8b_t32768_sparse90_block32", num_queries=1, num_q_heads=32, num_kv_heads=8,
               head_dim=128, cache_len=32768, lengths=(32768, 20001), density=0.1, block_size=32),
)  # fmt: skip


def _cases(cases, gpu_cases=()):
    params = [pytest.param("reference", case, id=f"reference-{case.name}") for case in cases]
    for case in (*cases, *gpu_cases):
        params.append(pytest.param("mosaic", case, id=f"mosaic-{case.name}", marks=pytest.mark.gpu))
    return params


def _rng(request) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def _starts(rng, case: DecodeCase):
    """int32 [B] per `case.starts`, or None for "zero"."""
    if case.starts == "zero":
        return None
    starts = []
    for b, length in enumerate(case.lengths):
        room = case.cache_len - length
        starts.append((0, room, int(rng.integers(0, room + 1)))[b % 3])
    return jnp.asarray(starts, jnp.int32)


def _qkv(request, case: DecodeCase, dtype, starts=None):
    """Fresh random q, k, v; with `starts`, the cache slots outside each row's tokens hold values 30× larger."""
    q_key, k_key, v_key, garbage_key = jax.random.split(harness.case_key(request), 4)
    q_shape = (case.batch, case.num_queries, case.num_q_heads, case.head_dim)
    kv_shape = (case.batch, case.cache_len, case.num_kv_heads, case.head_dim)
    scale = SCORE_STD**0.5
    q = scale * jax.random.normal(q_key, q_shape, jnp.float32)
    k = scale * jax.random.normal(k_key, kv_shape, jnp.float32)
    v = jax.random.normal(v_key, kv_shape, jnp.float32)
    if starts is not None:
        slots = jnp.arange(case.cache_len) - starts[:, None]  # [B, S]: position of each slot
        inside = ((slots >= 0) & (slots < jnp.asarray(case.lengths)[:, None]))[..., None, None]  # [B, S, 1, 1]
        garbage = 30.0 * jax.random.normal(garbage_key, (2, *kv_shape), jnp.float32)
        k, v = jnp.where(inside, k, garbage[0]), jnp.where(inside, v, garbage[1])
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def _selection(rng, case: DecodeCase, *, num_slots=None, beyond=True):
    """Random shuffled block lists, padded with -1: the partial last block always, each other valid block with
    probability `density`, and now and then (if `beyond`) a block wholly past the row's length (it must contribute
    nothing; with `starts`, its window may lie partly or wholly past the cache's last slot)."""
    num_blocks = -(-case.cache_len // case.block_size)
    num_slots = num_slots or num_blocks
    index = np.full((case.batch, case.num_kv_heads, num_slots), -1, np.int32)
    count = np.zeros((case.batch, case.num_kv_heads), np.int32)
    for b, length in enumerate(case.lengths):
        valid_blocks = -(-length // case.block_size)
        for k in range(case.num_kv_heads):
            if (b, k) in case.empty:
                continue
            chosen = [j for j in range(valid_blocks - 1) if rng.random() < case.density] + [valid_blocks - 1]
            if beyond and valid_blocks < num_blocks and rng.random() < 0.3:
                chosen.append(int(rng.integers(valid_blocks, num_blocks)))
            chosen = rng.permutation(np.asarray(chosen[:num_slots], np.int32))
            index[b, k, : len(chosen)] = chosen
            count[b, k] = len(chosen)
    return jnp.asarray(index), jnp.asarray(count)


def _oracle(q, k, v, lengths, index, count, sm_scale, starts=None, block_size=BLOCK):
    """float64 NumPy: out [B, T, N, H], lse [B, N, T] straight from the semantics, one query at a time."""
    q, k, v = (np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64) for x in (q, k, v))
    index, count = np.asarray(index), np.asarray(count)
    batch, num_queries, num_q_heads, _ = q.shape
    starts = np.zeros(batch, int) if starts is None else np.asarray(starts)
    group = num_q_heads // k.shape[2]
    out, lse = np.zeros(q.shape), np.full((batch, num_q_heads, num_queries), -np.inf)
    for b in range(batch):
        for n in range(num_q_heads):
            blocks = index[b, n // group, : count[b, n // group]]
            spans = [np.arange(j * block_size, (j + 1) * block_size) for j in blocks]
            keys = np.concatenate(spans or [np.zeros(0, int)])
            for t in range(num_queries):
                position = lengths[b] - num_queries + t
                attended = starts[b] + keys[keys <= position]  # cache slots of the attended positions
                if attended.size == 0:
                    continue
                scores = k[b, attended, n // group] @ q[b, t, n] * sm_scale
                weights = np.exp(scores - scores.max())
                out[b, t, n] = weights @ v[b, attended, n // group] / weights.sum()
                lse[b, n, t] = scores.max() + np.log(weights.sum())
    return out, lse


def _dense_decode(q, k, v, lengths, sm_scale, starts=None):
    """Plain jnp dense decode over each row's valid cache (causal among the T queries): out [B, T, N, H]."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    if starts is not None:  # row b's position p at index p; what wraps around lands at positions ≥ its length
        k = jax.vmap(lambda row, start: jnp.roll(row, -start, axis=0))(k, starts)
        v = jax.vmap(lambda row, start: jnp.roll(row, -start, axis=0))(v, starts)
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)  # [B, S, N, H]
    scores = jnp.einsum("btnh,bsnh->btns", q, k, precision=jax.lax.Precision.HIGHEST) * sm_scale
    positions = lengths[:, None] - q.shape[1] + jnp.arange(q.shape[1])  # [B, T]
    allowed = jnp.arange(k.shape[1]) <= positions[:, :, None, None]  # [B, T, 1, S]
    probs = jax.nn.softmax(jnp.where(allowed, scores, -jnp.inf), axis=-1)
    return jnp.einsum("btns,bsnh->btnh", probs, v, precision=jax.lax.Precision.HIGHEST)


def _run(implementation, q, k, v, lengths, index, count, **kwargs):
    """The op with its lse, on device memory poisoned with NaN first."""

    def decode():
        return block_sparse_decode(
            q, k, v, lengths, index, count, return_lse=True, implementation=implementation, **kwargs
        )

    harness.poison_device_memory(jax.eval_shape(decode))
    return decode()


def _check_against_oracle(request, case: DecodeCase, dtype, decode) -> None:
    """`decode(q, k, v, lengths, index, count, starts)` → (out, lse) on the case's fresh random inputs against the
    float64 oracle."""
    rng = _rng(request)
    starts = _starts(rng, case)
    q, k, v = _qkv(request, case, dtype, starts)
    lengths = jnp.asarray(case.lengths, jnp.int32)
    index, count = _selection(rng, case)
    out, lse = decode(q, k, v, lengths, index, count, starts)
    expected_out, expected_lse = _oracle(
        q, k, v, np.asarray(lengths), index, count, case.head_dim**-0.5, starts, case.block_size
    )
    assert out.dtype == q.dtype and out.shape == q.shape
    tolerance = harness.TOLERANCES[q.dtype]
    harness.assert_close(out, expected_out, tolerance, "out")
    harness.assert_lse_close(lse, expected_lse, tolerance)


@pytest.mark.parametrize(("implementation", "case"), _cases(CASES, GPU_CASES))
def test_matches_oracle(request, implementation, case):
    def decode(q, k, v, lengths, index, count, starts):
        return _run(implementation, q, k, v, lengths, index, count, starts=starts, block_size=case.block_size)

    _check_against_oracle(request, case, harness.DTYPES[implementation], decode)


@pytest.mark.parametrize(("implementation", "case"), _cases((*CASES[3:5], *CASES[-2:]), (GPU_CASES[0], GPU_CASES[-1])))
def test_all_blocks_equals_dense_decode(request, implementation, case):
    """Sparsity 0 (every block selected, shuffled) is dense decode attention over the valid cache."""
    rng = _rng(request)
    starts = _starts(rng, case)
    q, k, v = _qkv(request, case, harness.DTYPES[implementation], starts)
    lengths = jnp.asarray(case.lengths, jnp.int32)
    index, count = _selection(rng, dataclasses.replace(case, density=1.0, empty=()))
    out = block_sparse_decode(
        q, k, v, lengths, index, count, starts=starts, block_size=case.block_size, implementation=implementation
    )
    expected = _dense_decode(q, k, v, lengths, case.head_dim**-0.5, starts)
    valid = np.asarray(lengths)[:, None] - case.num_queries + np.arange(case.num_queries) >= 0  # [B, T]
    expected = np.where(valid[..., None, None], np.asarray(expected), 0.0)  # no key at all: 0
    harness.assert_close(out, expected, harness.TOLERANCES[q.dtype], "out")


@pytest.mark.parametrize("implementation", harness.IMPLEMENTATIONS)
def test_nothing_selected_gives_zeros(request, implementation):
    case = CASES[1]
    starts = _starts(_rng(request), case)
    q, k, v = _qkv(request, case, harness.DTYPES[implementation], starts)
    lengths = jnp.asarray(case.lengths, jnp.int32)
    index = jnp.full((case.batch, case.num_kv_heads, 4), -1, jnp.int32)
    count = jnp.zeros((case.batch, case.num_kv_heads), jnp.int32)
    out, lse = _run(implementation, q, k, v, lengths, index, count, starts=starts)
    np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)), 0.0)
    assert np.isneginf(np.asarray(lse)).all()


@pytest.mark.parametrize(("implementation", "case"), _cases((*CASES[:4], CASES[-2]), GPU_CASES[:1]))
def test_left_padded_equals_right_aligned(request, implementation, case):
    """The same tokens at slots starts[b] + p (left-padded) and at slots p (starts=None) give the same result."""
    rng = _rng(request)
    right_case = dataclasses.replace(case, starts="zero")
    starts = _starts(rng, case)
    zeros = jnp.zeros((case.batch,), jnp.int32)
    q, k, v = _qkv(request, right_case, harness.DTYPES[implementation], zeros)  # garbage past each row's length
    lengths = jnp.asarray(case.lengths, jnp.int32)
    index, count = _selection(rng, case)
    shift = jax.vmap(lambda row, start: jnp.roll(row, start, axis=0))  # slot p → slot starts[b] + p
    sizes = dict(block_size=case.block_size)
    left = _run(implementation, q, shift(k, starts), shift(v, starts), lengths, index, count, starts=starts, **sizes)
    right = _run(implementation, q, k, v, lengths, index, count, **sizes)
    same = dict(rtol=1e-5, atol=1e-6)  # the same keys in another slot order (XLA's sums), or bit-identical blocks
    for left_array, right_array in zip(left, right, strict=True):
        left_array, right_array = (np.asarray(x.astype(jnp.float32)) for x in (left_array, right_array))
        assert np.isfinite(right_array[right_array != -np.inf]).all()
        np.testing.assert_allclose(left_array, right_array, **same)
    assert (np.asarray(starts) % BLOCK).any()  # some row's blocks straddle two 64-slot tiles


@pytest.mark.parametrize("implementation", harness.IMPLEMENTATIONS)
def test_single_token_layout_padding_and_jit(request, implementation):
    """q [B, N, H] equals q [B, 1, N, H]; padding slot values change nothing; traced lengths/index work."""
    case = CASES[2]
    q, k, v = _qkv(request, case, harness.DTYPES[implementation])
    lengths = jnp.asarray(case.lengths, jnp.int32)
    index, count = _selection(_rng(request), case, num_slots=24)
    out4, lse4 = block_sparse_decode(q, k, v, lengths, index, count, return_lse=True, implementation=implementation)
    out3, lse3 = block_sparse_decode(
        q[:, 0], k, v, lengths, index, count, return_lse=True, implementation=implementation
    )
    assert out3.shape == q[:, 0].shape and lse3.shape == (case.batch, case.num_q_heads)
    same = dict(rtol=1e-5, atol=1e-6)  # one computation, up to XLA's fusion choices
    np.testing.assert_allclose(np.asarray(out3.astype(jnp.float32)), np.asarray(out4[:, 0].astype(jnp.float32)), **same)
    np.testing.assert_allclose(np.asarray(lse3), np.asarray(lse4[..., 0]), **same)
    padding = jnp.arange(index.shape[-1]) >= count[..., None]
    other_padding = jnp.where(padding, 7, index)
    decode = jax.jit(lambda *args: block_sparse_decode(q[:, 0], k, v, *args, implementation=implementation))
    out_jit = decode(lengths, other_padding, count)
    np.testing.assert_allclose(np.asarray(out_jit.astype(jnp.float32)), np.asarray(out3.astype(jnp.float32)), **same)


def test_contract_violations_raise():
    case = CASES[0]
    q, k, v = _qkv_plain(case)
    lengths = jnp.asarray(case.lengths, jnp.int32)
    count = jnp.full((case.batch, case.num_kv_heads), 2, jnp.int32)
    duplicate = jnp.zeros((case.batch, case.num_kv_heads, 3), jnp.int32)
    with pytest.raises(ValueError, match="distinct"):
        block_sparse_decode(q, k, v, lengths, duplicate, count)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        block_sparse_decode(q, k, v, lengths, duplicate.at[..., 1].set(4), count)
    with pytest.raises(ValueError, match="block_count"):
        block_sparse_decode(q, k, v, lengths, duplicate, count + 2)
    with pytest.raises(ValueError, match="lengths"):
        block_sparse_decode(q, k, v, lengths + 100, duplicate.at[..., 1].set(1), count)
    with pytest.raises(ValueError, match="T"):
        block_sparse_decode(jnp.tile(q, (1, 9, 1, 1)), k, v, lengths, duplicate.at[..., 1].set(1), count)
    index = duplicate.at[..., 1].set(1)
    room = case.cache_len - lengths
    with pytest.raises(ValueError, match="starts"):
        block_sparse_decode(q, k, v, lengths, index, count, starts=(room + 1).astype(jnp.int32))
    with pytest.raises(ValueError, match="starts"):
        block_sparse_decode(q, k, v, lengths, index, count, starts=jnp.full_like(lengths, -1))
    with pytest.raises(ValueError, match="starts"):
        block_sparse_decode(q, k, v, lengths, index, count, starts=room.astype(jnp.int16))
    out = block_sparse_decode(q, k, v, lengths, index, count, starts=room)  # rows ending at the last slot: fine
    assert np.isfinite(np.asarray(out)).all()


def _qkv_plain(case):
    keys = jax.random.split(input_key(3), 3)
    q = jax.random.normal(keys[0], (case.batch, case.num_queries, case.num_q_heads, case.head_dim))
    kv_shape = (case.batch, case.cache_len, case.num_kv_heads, case.head_dim)
    return q, jax.random.normal(keys[1], kv_shape), jax.random.normal(keys[2], kv_shape)


def test_implementation_choice():
    case = CASES[1]
    args = [jax.ShapeDtypeStruct(x.shape, jnp.bfloat16) for x in _qkv_plain(case)]
    args += [
        jax.ShapeDtypeStruct((case.batch,), jnp.int32),
        jax.ShapeDtypeStruct((case.batch, case.num_kv_heads, 8), jnp.int32),
        jax.ShapeDtypeStruct((case.batch, case.num_kv_heads), jnp.int32),
    ]
    expected = "mosaic" if dispatch.hopper_available() else "reference"
    assert block_sparse_decode_implementation(*args) == expected
    assert block_sparse_decode_implementation(*args, block_size=32) == "reference"  # the kernel declines
    assert block_sparse_decode_implementation(*args, implementation="reference") == "reference"
    with pytest.raises(NotImplementedError):
        block_sparse_decode_implementation(*args, block_size=32, implementation="mosaic")


@pytest.mark.slow
@pytest.mark.parametrize(
    "num_queries,num_kv_heads,block_size,compute_warpgroups,head_dim,keys_per_step",
    [
        (2, 1, 64, 1, 128, 64),
        (1, 2, 64, 1, 128, 64),
        (1, 2, 32, 1, 128, 64),
        (1, 2, 64, 2, 128, 64),
        (1, 2, 64, 2, 64, 128),
        (2, 1, 32, 1, 64, 128),
    ],
    ids=["T2-packed", "T1-direct", "T1-block32", "T1-two-compute-wgs", "h64-128-keys", "h64-128-keys-block32"],
)
def test_kernel_in_gpu_interpreter(
    request, num_queries, num_kv_heads, block_size, compute_warpgroups, head_dim, keys_per_step
):
    """The Mosaic GPU kernel's pipeline, split-K and masking in jax's GPU interpreter (CPU): 2 splits, rows starting
    at slots 0 and 5; T = 2 (query rows packed by the wrapper) and T = 1 (each group's heads copied from q by the
    kernel, the second group's from head 4 on), 64- and 32-key blocks, two compute warpgroups taking alternate steps
    (one of them with none in some splits), head_dim 128 (two halves) and 64 with 128-key steps (two or four blocks
    per step, a split's last step partly repeated). The interpreter
    does not model the TMA's zero fill past the cache's end, so no selected window runs past it here (the
    gpu-marked cases cover that)."""
    if dispatch.hopper_available():
        pytest.skip("the compiled kernel runs on this machine (the gpu-marked cases)")
    interpret = pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.params")
    case = DecodeCase(
        name="interpret", num_queries=num_queries, num_q_heads=4 * num_kv_heads, num_kv_heads=num_kv_heads,
        head_dim=head_dim, cache_len=320, lengths=(200, 2), density=0.6, block_size=block_size,
    )  # fmt: skip
    starts = jnp.asarray([0, 5], jnp.int32)
    q, k, v = _qkv(request, case, jnp.bfloat16, starts)
    lengths = jnp.asarray(case.lengths, jnp.int32)
    index, count = _selection(_rng(request), case, beyond=False)  # windows end by slot 5 + 255 < 320
    out, lse = kernel_sm90.block_sparse_decode_sm90(
        q, k, v, lengths, index, count, starts=starts, block_size=block_size, sm_scale=case.head_dim**-0.5,
        config=kernel_sm90.Config(
            num_splits=2, num_stages=2, compute_warpgroups=compute_warpgroups, keys_per_step=keys_per_step
        ),
        interpret=interpret.InterpretGPUParams(),
    )  # fmt: skip
    expected_out, expected_lse = _oracle(
        q, k, v, np.asarray(lengths), index, count, case.head_dim**-0.5, np.asarray(starts), block_size
    )
    harness.assert_close(out, expected_out, 1e-2, "out")
    harness.assert_lse_close(lse, expected_lse, 1e-2)


def test_config_rejects_what_the_kernel_cannot_run():
    for bad, match in (
        (dict(num_splits=0), "num_splits"),
        (dict(num_splits=1, num_stages=0), "num_stages"),
        (dict(num_splits=1, compute_warpgroups=3), "compute_warpgroups"),
        (dict(num_splits=1, num_stages=3, compute_warpgroups=2), "even num_stages"),
        (dict(num_splits=1, keys_per_step=96), "keys_per_step"),
    ):
        with pytest.raises(ValueError, match=match):
            kernel_sm90.Config(**bad)
    for batch in (1, 16):  # the defaults are valid configs the GPU tests run
        for head_dim, keys in ((128, 64), (64, 128)):  # 128-key steps at head_dim 64 (KEYS_128 below)
            config = kernel_sm90.default_config(batch=batch, num_kv_heads=8, num_slots=2048, head_dim=head_dim)
            assert config.compute_warpgroups == 2 and config.num_stages in (2, 4)
            assert config.keys_per_step == keys


CONFIGS = (
    kernel_sm90.Config(num_splits=3, num_stages=4, compute_warpgroups=1),
    kernel_sm90.Config(num_splits=1, num_stages=2, compute_warpgroups=2),
    kernel_sm90.Config(num_splits=5, num_stages=4, compute_warpgroups=2),
)
KEYS_128 = (  # 128-key steps (head_dim 64 only)
    kernel_sm90.Config(num_splits=3, num_stages=4, compute_warpgroups=1, keys_per_step=128),
    kernel_sm90.Config(num_splits=5, num_stages=2, compute_warpgroups=2, keys_per_step=128),
)
CONFIG_CASES = [
    (case, config) for case in (CASES[1], CASES[4], CASES[6], GPU_CASES[0], GPU_CASES[2]) for config in CONFIGS
] + [(case, config) for case in (CASES[0], CASES[2], CASES[6], CASES[9], GPU_CASES[1]) for config in KEYS_128]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "case,config",
    CONFIG_CASES,
    ids=[
        f"{case.name}-S{c.num_splits}-ST{c.num_stages}-W{c.compute_warpgroups}-K{c.keys_per_step}"
        for case, c in CONFIG_CASES
    ],
)
def test_kernel_configs_on_gpu(request, case, config):
    """The compiled kernel under configs other than its default (one and two compute warpgroups, 2- to 4-deep rings,
    1 to 5 splits, so that some splits give a warpgroup no step; 128-key steps at head_dim 64 with 64- and 32-key
    blocks) against the oracle, on poisoned memory."""
    if not dispatch.hopper_available():
        pytest.skip("needs a Hopper GPU")

    def decode(q, k, v, lengths, index, count, starts):
        def kernel():
            return kernel_sm90.block_sparse_decode_sm90(
                q, k, v, lengths, index, count, starts=starts, block_size=case.block_size,
                sm_scale=case.head_dim**-0.5, config=config,
            )  # fmt: skip

        harness.poison_device_memory(jax.eval_shape(kernel))
        return kernel()

    _check_against_oracle(request, case, jnp.bfloat16, decode)


def test_combine_merges_splits_by_logsumexp():
    """The split merge against the float64 logsumexp merge of the same partials: empty
    splits (lse −inf) weigh 0, a row with every split empty gives out 0 and lse −inf, never NaN."""
    num_queries, group, num_splits, rows, head_dim = 2, 3, 5, 8, 16
    keys = jax.random.split(input_key(11), 3)
    out_splits = jax.random.normal(keys[0], (2, 3, num_splits, rows, head_dim))
    lse_log2 = 5 * jax.random.normal(keys[1], (2, 3, num_splits, rows))
    lse_log2 = jnp.where(jax.random.uniform(keys[2], lse_log2.shape) < 0.4, -jnp.inf, lse_log2)
    lse_log2 = lse_log2.at[0, 0, :, 1].set(-jnp.inf)  # query row 1 of (b 0, kv head 0): nothing attended
    out, lse = kernel_sm90.combine(out_splits, lse_log2, num_queries=num_queries, group=group)

    used = num_queries * group
    lse_nat = np.asarray(lse_log2, np.float64)[..., :used] * np.log(2.0)  # [B, K, S, R]
    top = np.max(lse_nat, axis=2, keepdims=True)
    weights = np.exp(lse_nat - np.where(np.isfinite(top), top, 0.0))  # [B, K, S, R]
    total = weights.sum(axis=2)  # [B, K, R]
    merged = np.einsum("bksr,bksrh->bkrh", weights, np.asarray(out_splits, np.float64)[..., :used, :])
    merged /= np.where(total == 0, 1.0, total)[..., None]
    merged_lse = np.where(total == 0, -np.inf, np.squeeze(top, 2) + np.log(np.where(total == 0, 1.0, total)))
    expected_out = merged.reshape(2, 3, num_queries, group, head_dim).transpose(0, 2, 1, 3, 4).reshape(2, 2, 9, -1)
    expected_lse = merged_lse.reshape(2, 3, num_queries, group).transpose(0, 1, 3, 2).reshape(2, 9, num_queries)
    np.testing.assert_allclose(np.asarray(out), expected_out, rtol=1e-5, atol=1e-6)
    assert np.array_equal(np.isneginf(np.asarray(lse)), np.isneginf(expected_lse)) and np.isneginf(lse[0, 1, 0])
    finite = np.isfinite(expected_lse)
    np.testing.assert_allclose(np.asarray(lse)[finite], expected_lse[finite], rtol=1e-5, atol=1e-5)
    assert not np.isnan(np.asarray(out)).any() and not np.asarray(out)[0, 0, 1].any()
