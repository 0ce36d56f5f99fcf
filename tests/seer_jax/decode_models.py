"""Tiny SeerCausalLMs with random prefill and decode gates for the sparse-decoding tests, built without eager init.

Decode blocks are 16 positions (DECODE_BLOCK) so that short prompts span several blocks.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seer_jax.decode_config import DecodeConfig
from seer_jax.decode_gate import DECODE_GATE_PARAMS
from seer_jax.gate import GateConfig, GateParam
from seer_jax.model import CausalLM
from seer_jax.seer import SeerCausalLM, seer_with_abstract_gates
from seer_jax.seer_config import SeerConfig
from seer_jax.sparsity import Selection
from tests.seer_jax.tiny_models import TINY, random_module, random_tokens

DECODE_BLOCK = 16
GATE = GateConfig(hidden_size=TINY.head_dim)
# The released gates' structure (Qproj, Kmaxminavg, q/k norm) at E = 8.
DECODE = DecodeConfig(hidden_size=8, block_size=DECODE_BLOCK, qk_norm=True, token_budget=10**6)
DENSE_PREFILL = Selection()
SPARSE_PREFILL = Selection(nz_ratio=0.3)


@functools.cache
def base_model() -> CausalLM:
    return random_module(lambda: CausalLM(TINY, rngs=nnx.Rngs(0)), 0, weight_std=0.3)


@functools.cache
def _gates(gate_structure: DecodeConfig) -> SeerCausalLM:
    config = SeerConfig(gate=GATE, decode=gate_structure)
    return random_module(lambda: SeerCausalLM(TINY, config, rngs=nnx.Rngs(0)), 1, weight_std=0.3)


def _gate_structure(decode: DecodeConfig) -> DecodeConfig:
    fields = ("q_head_pooling", "k_pooling", "hidden_size", "block_size", "qk_norm")
    return DecodeConfig(**{name: getattr(decode, name) for name in fields})


@functools.cache
def decode_model(decode: DecodeConfig | None = DECODE, prefill: Selection = DENSE_PREFILL) -> SeerCausalLM:
    """The base model's weights plus random gates (the same gates for every selection of one gate structure)."""
    seer = seer_with_abstract_gates(base_model(), SeerConfig(gate=GATE, selection=prefill, decode=decode))
    gates = _gates(_gate_structure(DECODE if decode is None else decode))
    nnx.update(seer, nnx.state(gates, GateParam if decode else nnx.All(GateParam, nnx.Not(DECODE_GATE_PARAMS))))
    return seer


def with_decode(**changes) -> DecodeConfig:
    return dataclasses.replace(DECODE, **changes)


def padded_batch(length: int, padding: tuple[int, ...] = (0, 13)) -> tuple[jax.Array, jax.Array]:
    """Left-padded prompts [B, length]: row b has padding[b] padding tokens (id 0) first."""
    mask = np.arange(length)[None, :] >= np.asarray(padding)[:, None]
    return jnp.asarray(np.where(mask, random_tokens(0, len(padding), length), 0)), jnp.asarray(mask)
