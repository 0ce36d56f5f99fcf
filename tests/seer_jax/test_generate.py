"""`generate` and `sample_tokens`: EOS handling against HF, sampling, bf16."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from seer_jax.checkpoint import load_model
from seer_jax.generate import TokenStream, generate, prefill, sample_tokens
from seer_jax.model import CausalLM
from tests.seer_jax.hf_reference import LENGTH, PAD_TOKEN, hf_logits, relative_error
from tests.seer_jax.tiny_models import TINY, random_module, random_tokens

PROBS = np.asarray([0.4, 0.3, 0.2, 0.1])


def draws(temperature: float, top_p: float, count: int = 4000) -> np.ndarray:
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(PROBS)), (count, len(PROBS)))  # [B, V]
    return np.asarray(sample_tokens(logits, jax.random.key(0), temperature=temperature, top_p=top_p))


def test_greedy_is_argmax():
    logits = jnp.asarray([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    np.testing.assert_array_equal(sample_tokens(logits, jax.random.key(0), temperature=0.0, top_p=1.0), [1, 0])


def test_sampling_follows_softmax():
    frequencies = np.bincount(draws(1.0, 1.0), minlength=4) / 4000
    np.testing.assert_allclose(frequencies, PROBS, atol=0.03)


def test_top_p_keeps_the_nucleus():
    """top_p=0.5 keeps tokens whose preceding cumulative probability is < 0.5: the first two."""
    frequencies = np.bincount(draws(1.0, 0.5), minlength=4) / 4000
    assert frequencies[2:].sum() == 0
    np.testing.assert_allclose(frequencies[:2], PROBS[:2] / PROBS[:2].sum(), atol=0.03)
    assert set(draws(1.0, 0.01)) == {0}  # the top token always survives


def test_eos_handling_matches_hf(hf_checkpoint, padded_batch):
    """Rows stop at EOS and are padded afterwards, exactly as HF's greedy generate does."""
    hf_model, directory = hf_checkpoint("llama31")
    tokens, mask = padded_batch
    model, _ = load_model(directory)
    free = np.asarray(generate(model, jnp.asarray(tokens), jnp.asarray(mask), max_new_tokens=16, eos_token_id=()))
    eos = int(free[1, 4])
    ours = np.asarray(generate(model, jnp.asarray(tokens), jnp.asarray(mask), max_new_tokens=16, eos_token_id=eos))
    config = transformers.GenerationConfig(max_new_tokens=16, do_sample=False, eos_token_id=eos, pad_token_id=PAD_TOKEN)
    with torch.no_grad():
        reference = hf_model.generate(
            input_ids=torch.from_numpy(tokens),
            attention_mask=torch.from_numpy(mask.astype(np.int64)),
            generation_config=config,
        )[:, LENGTH:].numpy()
    width = reference.shape[1]  # HF stops once every row has finished
    np.testing.assert_array_equal(ours[:, :width], reference)
    assert (ours[:, width:] == PAD_TOKEN).all()
    first_eos = int(np.argmax(ours[1] == eos))
    assert first_eos <= 4 and (ours[1, first_eos + 1 :] == PAD_TOKEN).all()


def test_sampled_generation(hf_checkpoint, padded_batch):
    _, directory = hf_checkpoint("llama31")
    tokens, mask = (jnp.asarray(x) for x in padded_batch)
    model, config = load_model(directory)
    kwargs = dict(max_new_tokens=12, temperature=0.8, top_p=0.9, eos_token_id=())
    first = np.asarray(generate(model, tokens, mask, rng=jax.random.key(1), **kwargs))
    again = np.asarray(generate(model, tokens, mask, rng=jax.random.key(1), **kwargs))
    other = np.asarray(generate(model, tokens, mask, rng=jax.random.key(2), **kwargs))
    np.testing.assert_array_equal(first, again)
    assert (first != other).any()
    assert first.shape == (3, 12) and ((first >= 0) & (first < config.vocab_size)).all()


def test_bfloat16_model(hf_checkpoint, padded_batch):
    hf_model, directory = hf_checkpoint("qwen3_qknorm_tied")
    tokens, mask = (jnp.asarray(x) for x in padded_batch)
    bf16, _ = load_model(directory, dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(bf16)} == {jnp.dtype(jnp.bfloat16)}
    logits, cache = prefill(bf16, tokens, mask, max_length=LENGTH + 4, return_all_logits=True)
    assert logits.dtype == jnp.bfloat16 and cache.keys[0].dtype == jnp.bfloat16
    assert relative_error(logits, hf_logits(hf_model, *padded_batch), padded_batch[1]) <= 5e-2
    generated = generate(bf16, tokens, mask, max_new_tokens=4, eos_token_id=())
    assert generated.shape == (3, 4)


def test_invalid_arguments(hf_checkpoint):
    _, directory = hf_checkpoint("llama31")
    model, _ = load_model(directory)
    tokens = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="needs rng"):
        generate(model, tokens, max_new_tokens=2, temperature=1.0)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate(model, tokens, max_new_tokens=0)
    with pytest.raises(ValueError, match="0 < top_p <= 1"):
        generate(model, tokens, max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match="max_length"):
        prefill(model, tokens, max_length=3)


def stream_tokens(stream: TokenStream) -> np.ndarray:
    """The stream's steps as int32 [B, steps]."""
    return np.stack([np.asarray(step) for step in stream], axis=1)


def test_token_stream_equals_generate():
    """Sampling (temperature and top-p) on a left-padded batch, with an EOS that ends row 0 early: the stream yields
    generate's columns, then stops where generate does. One layer: compiling is most of this test's time."""
    config = dataclasses.replace(TINY, num_layers=1)
    model = random_module(lambda: CausalLM(config, rngs=nnx.Rngs(0)), 3, weight_std=0.3)
    tokens = jnp.asarray(random_tokens(0, 2, 12))
    mask = jnp.asarray(np.arange(12)[None, :] >= np.array([[0], [5]]))  # row 1: 5 padding tokens
    options = dict(max_new_tokens=6, temperature=1.0, top_p=0.9, rng=jax.random.key(7), pad_token_id=0)
    free_stream = TokenStream(model, tokens, mask, eos_token_id=(), collect=(), **options)
    free = stream_tokens(free_stream)
    assert free.shape == (2, 6) and free_stream.compile_seconds > 0
    assert free_stream.collected == ({},)  # one layer, nothing asked for
    eos = int(free[0, 2])  # row 0 ends at step 2 at the latest
    expected = np.asarray(generate(model, tokens, mask, eos_token_id=eos, **options))
    streamed = stream_tokens(TokenStream(model, tokens, mask, eos_token_id=eos, **options))
    np.testing.assert_array_equal(streamed, expected[:, : streamed.shape[1]])
    assert (expected[:, streamed.shape[1] :] == 0).all()  # generate had stopped there too
    np.testing.assert_array_equal(
        streamed[0, :3][: list(streamed[0]).index(eos) + 1], free[0, : list(streamed[0]).index(eos) + 1]
    )
