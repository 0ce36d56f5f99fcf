"""Text generation: inference with a KV cache (`seer_jax.generate.decoding`) and the `python -m seer_jax.generate`
command line (`seer_jax.generate.cli`).

    from seer_jax.generate import generate, prefill, decode_step, sample_tokens, TokenStream

The names are imported on first use (PEP 562 `__getattr__`), so that the command line starts, and answers
`--help`, without importing jax.
"""

import importlib

__all__ = ["TokenStream", "decode_step", "generate", "prefill", "sample_tokens"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("seer_jax.generate.decoding"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
