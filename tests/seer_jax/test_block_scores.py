"""Oracle and training-free block scores: requested density, no empty rows, what each selects, and (testbed) the
oracle against StreamingLLM on the pretrained tiny Llama."""

import dataclasses
import gzip
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tokenizers import Tokenizer

from pallas_kernels.attention_with_pooling import attention_with_pooling
from seer_jax import block_scores
from seer_jax.checkpoint import load_model
from seer_jax.gate import AttnGate, GateConfig
from seer_jax.seer import SeerConfig, seer_from_base
from seer_jax.sparsity import Selection, block_density, masked_softmax, select_blocks, topk_per_row
from tests.seer_jax.tiny_models import TINY, random_module

NUM_BLOCKS = 64  # J >= 64: TopK density within ±0.02 of the target
LENGTH = NUM_BLOCKS * 64 - 20  # a ragged last block


def random_qkv(seed: int, length: int = LENGTH):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, length, 4, 16), np.float32) * 2.0
    k = rng.standard_normal((1, length, 2, 16), np.float32) * 2.0 + 0.3
    v = rng.standard_normal((1, length, 2, 16), np.float32)
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def scores_for(source: str) -> jax.Array:
    q, k, v = random_qkv(0)
    shape = (1, 4, NUM_BLOCKS, NUM_BLOCKS)
    if source == "oracle":
        return block_scores.oracle_scores(q, k, v, block_size=64)
    if source == "quest":
        return block_scores.quest_scores(q, k, block_size=64)
    if source == "streaming":
        return block_scores.streaming_scores(shape)
    return block_scores.random_scores(jax.random.key(0), shape)


@pytest.mark.parametrize("source", ["oracle", "quest", "streaming", "random"])
@pytest.mark.parametrize("nz_ratio", [0.1, 0.3])
def test_requested_density_and_no_empty_rows(source, nz_ratio):
    scores = scores_for(source)
    assert scores.shape == (1, 4, NUM_BLOCKS, NUM_BLOCKS) and np.isfinite(np.asarray(scores)).all()
    mask = np.asarray(select_blocks(scores, Selection(nz_ratio=nz_ratio)))
    np.testing.assert_allclose(block_density(jnp.asarray(mask)), nz_ratio, atol=0.02)
    assert mask.any(axis=-1).all() and np.diagonal(mask, axis1=-2, axis2=-1).all()


def test_streaming_keeps_the_sink_and_the_most_recent_blocks():
    mask = np.asarray(select_blocks(block_scores.streaming_scores((1, 1, 64, 64)), Selection(nz_ratio=0.3)))[0, 0]
    keep = topk_per_row(0.3, 64)
    for row in range(64):
        expected = {0} | set(range(max(0, row - keep + 2), row + 1))
        assert set(np.flatnonzero(mask[row])) == expected


def test_oracle_is_the_log_of_the_pooled_attention():
    """TopK keeps the largest pooled probabilities; the row softmax (threshold method) is the pooled map itself."""
    q, k, v = random_qkv(1, 300)
    _, pooled = attention_with_pooling(q, k, v)
    scores = block_scores.oracle_scores(q, k, v, block_size=64)
    np.testing.assert_allclose(masked_softmax(scores), pooled, atol=1e-6)
    mask = np.asarray(select_blocks(scores, Selection(nz_ratio=0.5)))
    kept, dropped = np.where(mask, pooled, np.inf).min(-1), np.where(mask, -np.inf, pooled).max(-1)
    diagonal = np.diagonal(np.asarray(pooled), axis1=-2, axis2=-1)
    assert ((kept >= dropped) | (kept == diagonal)).all()  # only a forced diagonal may be smaller


def test_quest_is_the_product_of_mean_pooled_blocks():
    q, k, _ = random_qkv(2, 150)
    scores = np.asarray(block_scores.quest_scores(q, k, block_size=64, lengths=jnp.asarray([130])))
    q, k = np.asarray(q, np.float64)[0, :130], np.asarray(k, np.float64)[0, :130]
    q_mean = np.stack([q[start : start + 64].mean(0) for start in range(0, 130, 64)])  # [3, N, H]
    k_mean = np.stack([k[start : start + 64].mean(0) for start in range(0, 130, 64)])  # [3, K, H]
    expected = np.einsum("inh,jnh->nij", q_mean, np.repeat(k_mean, 2, axis=1)) / 4.0
    np.testing.assert_allclose(scores[0, :, :3, :3], expected, rtol=1e-5, atol=1e-6)


def test_gate_with_a_quest_weight_adds_the_weighted_quest_scores():
    """The "gate" source with quest_weight w: the gate's logits (its own call) plus w × `quest_scores` (checked
    against NumPy above) on the rotated q/k, on a ragged row."""
    q, k, v = random_qkv(5, 150)  # TINY's heads: 4 query, 2 kv, head_dim 16
    gate_config = GateConfig(hidden_size=TINY.head_dim)
    gate = random_module(
        lambda: AttnGate(TINY, gate_config, param_dtype=jnp.float32, rngs=nnx.Rngs(0)), 2, weight_std=0.3
    )
    lengths = jnp.asarray([130])
    inputs = block_scores.ScoreInputs(
        q=q, k=k, q_rot=q * 0.5, k_rot=k + 0.1, v=v, lengths=lengths, gate=gate, key=jax.random.key(0)
    )
    weighted = dataclasses.replace(inputs, quest_weight=0.5)
    logits = np.asarray(gate(q, k, lengths=lengths))
    quest = np.asarray(block_scores.quest_scores(q * 0.5, k + 0.1, block_size=64, lengths=lengths))
    np.testing.assert_array_equal(np.asarray(block_scores.SOURCES["gate"](inputs)), logits)
    np.testing.assert_allclose(np.asarray(block_scores.SOURCES["gate"](weighted)), logits + 0.5 * quest, rtol=1e-6)
    assert np.abs(quest[0, :, :3, :3]).max() > 0.1


def test_random_scores_follow_the_key():
    shape = (1, 4, NUM_BLOCKS, NUM_BLOCKS)
    first, again = (
        block_scores.random_scores(jax.random.key(3), shape),
        block_scores.random_scores(jax.random.key(3), shape),
    )
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, block_scores.random_scores(jax.random.key(4), shape))


@pytest.mark.testbed
def test_oracle_beats_streaming_on_the_pretrained_model(testbed_dir):
    """At equal density on real attention, the oracle's blocks keep the next-token distribution closer to dense."""
    hf_dir = testbed_dir / "seer-tiny-llama"
    base, config = load_model(hf_dir)
    with gzip.open(testbed_dir / "data" / "eval_stdlib.jsonl.gz", "rt") as lines:
        text = json.loads(lines.readline())["text"]
    ids = [config.bos_token_id, *Tokenizer.from_file(str(hf_dir / "tokenizer.json")).encode(text).ids[:1023]]
    tokens = jnp.asarray([ids], jnp.int32)  # J = 16 blocks

    @nnx.jit
    def log_probs(model, tokens):
        return jax.nn.log_softmax(model(tokens)[0], axis=-1)

    dense = log_probs(base, tokens)
    divergence = {}
    for source in ("oracle", "streaming"):
        seer_config = SeerConfig(gate=GateConfig(hidden_size=config.head_dim), selection=Selection(nz_ratio=0.3))
        seer = seer_from_base(base, dataclasses.replace(seer_config, source=source), rngs=nnx.Rngs(0))
        sparse = log_probs(seer, tokens)
        divergence[source] = float(jnp.mean(jnp.sum(jnp.exp(dense) * (dense - sparse), axis=-1)))
    assert 0 < divergence["oracle"] < 0.5 * divergence["streaming"]
