"""End-to-end benchmarks (GPU)."""
