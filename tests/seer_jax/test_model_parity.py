"""The Flax model equals HF transformers (torch, fp32) on tiny random checkpoints of every supported family."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from seer_jax.checkpoint import load_model
from seer_jax.generate import decode_step, generate, prefill
from tests.seer_jax.hf_reference import FAMILIES, LENGTH, PAD_TOKEN, ROPE_VARIANTS, hf_logits, relative_error

TOLERANCE = 1e-4
NEW_TOKENS = 32


def hf_generate(model, tokens, mask, *, max_new_tokens, eos_token_id=None) -> np.ndarray:
    config = transformers.GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_token_id, pad_token_id=PAD_TOKEN
    )
    with torch.no_grad():
        output = model.generate(
            input_ids=torch.from_numpy(tokens),
            attention_mask=torch.from_numpy(mask.astype(np.int64)),
            generation_config=config,
        )
    return output[:, tokens.shape[1] :].numpy()


@pytest.mark.parametrize("name", [*FAMILIES, *ROPE_VARIANTS])
def test_logits_match_hf(name, hf_checkpoint, padded_batch):
    hf_model, directory = hf_checkpoint(name)
    tokens, mask = padded_batch
    model, _ = load_model(directory)
    logits, _ = prefill(model, jnp.asarray(tokens), jnp.asarray(mask), max_length=LENGTH, return_all_logits=True)
    assert np.isfinite(np.asarray(logits)).all()  # padded rows too
    assert relative_error(logits, hf_logits(hf_model, tokens, mask), mask) <= TOLERANCE


def test_unmasked_batch_matches_masked(hf_checkpoint, padded_batch):
    """attention_mask=None (the unmasked cuDNN path) gives the logits of an all-ones mask."""
    _, directory = hf_checkpoint("llama31")
    tokens, mask = padded_batch
    model, _ = load_model(directory)
    first_row = jnp.asarray(tokens[:1])
    unmasked, _ = prefill(model, first_row, None, max_length=LENGTH, return_all_logits=True)
    masked, _ = prefill(model, first_row, jnp.asarray(mask[:1]), max_length=LENGTH, return_all_logits=True)
    np.testing.assert_allclose(unmasked, masked, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_generate_matches_hf(name, hf_checkpoint, padded_batch):
    hf_model, directory = hf_checkpoint(name)
    tokens, mask = padded_batch
    model, _ = load_model(directory)
    ours = generate(model, jnp.asarray(tokens), jnp.asarray(mask), max_new_tokens=NEW_TOKENS, eos_token_id=())
    np.testing.assert_array_equal(ours, hf_generate(hf_model, tokens, mask, max_new_tokens=NEW_TOKENS))


@pytest.mark.parametrize("name", FAMILIES)
def test_prefill_then_decode_equals_forward(name, hf_checkpoint, padded_batch):
    _, directory = hf_checkpoint(name)
    tokens, mask = padded_batch
    model, _ = load_model(directory)
    full, _ = prefill(model, jnp.asarray(tokens), jnp.asarray(mask), max_length=LENGTH, return_all_logits=True)
    prompt_length = LENGTH - 6
    logits, cache = prefill(
        model, jnp.asarray(tokens[:, :prompt_length]), jnp.asarray(mask[:, :prompt_length]), max_length=LENGTH
    )
    stepped = [logits]
    for position in range(prompt_length, LENGTH - 1):
        logits, cache = decode_step(model, jnp.asarray(tokens[:, position]), cache)
        stepped.append(logits)
    stepped = np.stack(stepped, axis=1)  # [B, 6, V]: predictions made at positions prompt_length - 1 .. LENGTH - 2
    expected = np.asarray(full[:, prompt_length - 1 : LENGTH - 1])
    assert relative_error(stepped, expected, np.ones(stepped.shape[:2], bool)) <= 1e-5
    assert int(cache.length) == LENGTH - 1


@pytest.mark.gpu
def test_cudnn_model_matches_xla(hf_checkpoint, padded_batch):
    """bf16 model with cuDNN attention against the same model with XLA attention, padded and unpadded."""
    _, directory = hf_checkpoint("llama31")
    tokens, mask = (jnp.asarray(x) for x in padded_batch)
    xla, _ = load_model(directory, dtype=jnp.bfloat16)
    cudnn, _ = load_model(directory, dtype=jnp.bfloat16, attention_implementation="cudnn")
    for batch_mask in (mask, None):
        reference, _ = prefill(xla, tokens, batch_mask, max_length=LENGTH, return_all_logits=True)
        logits, _ = prefill(cudnn, tokens, batch_mask, max_length=LENGTH, return_all_logits=True)
        rows = np.ones(tokens.shape, bool) if batch_mask is None else padded_batch[1]
        assert np.isfinite(np.asarray(logits, np.float32)).all()
        assert relative_error(logits, reference, rows) <= 2e-2
    generated = generate(cudnn, tokens, mask, max_new_tokens=8, eos_token_id=())
    assert generated.shape == (3, 8)
