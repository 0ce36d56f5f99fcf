"""Named attention shapes: the one list that feeds the kernel tests and `pallas_kernels.bench`.

Tests run `TEST_SHAPES` on CPU (the references against a float64 NumPy oracle) and on the H200 (the kernels
against the references), plus `GPU_TEST_SHAPES` there only. The benchmark runs `BENCH_SHAPES` (Llama-3.1-8B
attention: 32 query heads, 8 kv heads, head_dim 128) or `BENCH_SHAPES[0]` at the lengths it is given, or the heads
of another `BENCH_HEADS` entry (`--heads`): the small models whose short rows leave SMs idle.
"""

import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionShape:
    """Causal self-attention problem size: q [B, T, N, H], k/v [B, T, K, H]."""

    name: str
    batch: int
    seq_len: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self):
        for field in ("batch", "seq_len", "num_q_heads", "num_kv_heads", "head_dim"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(
                f"num_q_heads ({self.num_q_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )

    @property
    def group_size(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def q_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.seq_len, self.num_q_heads, self.head_dim)

    @property
    def kv_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.seq_len, self.num_kv_heads, self.head_dim)

    def num_blocks(self, block_size: int = 64) -> int:
        return -(-self.seq_len // block_size)

    def with_seq_len(self, seq_len: int) -> "AttentionShape":
        base_name = self.name.rsplit("_t", 1)[0]
        return dataclasses.replace(self, name=f"{base_name}_t{seq_len}", seq_len=seq_len)


# A covering grid, not a product: GQA ratios G ∈ {1, 4, 8} and head_dim ∈ {64, 128} each meet lengths around the
# 64-block boundary (1, 63, 64, 65) and a ragged mid length (1000); the long one (4096) has 2 small heads (G = 2)
# so that the float64 NumPy oracle stays fast on CPU.
TEST_SHAPES: tuple[AttentionShape, ...] = (
    AttentionShape(name="g1_h64_t1", batch=1, seq_len=1, num_q_heads=2, num_kv_heads=2, head_dim=64),
    AttentionShape(name="g4_h128_t63", batch=2, seq_len=63, num_q_heads=4, num_kv_heads=1, head_dim=128),
    AttentionShape(name="g8_h64_t64", batch=1, seq_len=64, num_q_heads=8, num_kv_heads=1, head_dim=64),
    AttentionShape(name="g1_h128_t65", batch=2, seq_len=65, num_q_heads=2, num_kv_heads=2, head_dim=128),
    AttentionShape(name="g4_h64_t1000", batch=1, seq_len=1000, num_q_heads=8, num_kv_heads=2, head_dim=64),
    AttentionShape(name="g8_h128_t1000", batch=1, seq_len=1000, num_q_heads=8, num_kv_heads=1, head_dim=128),
    AttentionShape(name="g2_h64_t4096", batch=1, seq_len=4096, num_q_heads=2, num_kv_heads=1, head_dim=64),
)

GPU_TEST_SHAPES: tuple[AttentionShape, ...] = (
    AttentionShape(name="llama3_8b_t32768", batch=1, seq_len=32768, num_q_heads=32, num_kv_heads=8, head_dim=128),
)

BENCH_SHAPES: tuple[AttentionShape, ...] = tuple(
    AttentionShape(name=f"llama3_8b_t{seq_len}", batch=1, seq_len=seq_len, num_q_heads=32, num_kv_heads=8, head_dim=128)
    for seq_len in (8192, 32768, 131072)
)

# The head layouts `pallas_kernels.bench --heads` offers: (query heads, kv heads, head_dim) at batch 1.
BENCH_HEADS: dict[str, tuple[int, int, int]] = {
    "llama3_8b": (32, 8, 128),  # Llama-3.1-8B, the default
    "smollm2_135m": (9, 3, 64),  # SmolLM2-135M (the real testbed), issue 19's small shape at 8k
    "mha16_h64": (16, 16, 64),  # 16 MHA heads of 64, issue 19's small shape at 4k
}


def bench_shape(heads: str, seq_len: int) -> AttentionShape:
    """The `BENCH_HEADS[heads]` layout at batch 1 and `seq_len`."""
    if heads not in BENCH_HEADS:
        raise ValueError(f"heads: {heads!r} is not one of {sorted(BENCH_HEADS)}")
    num_q_heads, num_kv_heads, head_dim = BENCH_HEADS[heads]
    return AttentionShape(
        name=f"{heads}_t{seq_len}",
        batch=1,
        seq_len=seq_len,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
    )
