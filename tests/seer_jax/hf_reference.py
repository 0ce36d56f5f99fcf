"""Reference side of the parity tests: tiny random Hugging Face models (torch, fp32) and comparison helpers."""

import numpy as np
import torch
import transformers

BATCH, LENGTH, VOCAB = 3, 64, 128
PAD_TOKEN = 0
# Row 0 is unpadded; rows 1 and 2 start with 10 and 40 padding tokens.
PADDING = (0, 10, 40)

_BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,  # explicit, != hidden_size // num_attention_heads
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=PAD_TOKEN,
)
_LLAMA31_ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=32,
)

# name → (HF config class, overrides of _BASE)
FAMILIES = {
    "llama31": (transformers.LlamaConfig, dict(rope_parameters=_LLAMA31_ROPE)),
    "mistral": (transformers.MistralConfig, dict(sliding_window=4096)),
    "qwen2_bias": (transformers.Qwen2Config, dict(rope_parameters=dict(rope_type="default", rope_theta=1e6))),
    "qwen3_qknorm_tied": (transformers.Qwen3Config, dict(tie_word_embeddings=True)),
}
ROPE_VARIANTS = {
    "default": (transformers.LlamaConfig, dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
    "linear": (
        transformers.LlamaConfig,
        dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0)),
    ),
    # transformers-4 keys, as Qwen2.5 ships them
    "yarn_v4_keys": (
        transformers.Qwen2Config,
        dict(rope_theta=1e6, rope_scaling=dict(type="yarn", factor=8.0, original_max_position_embeddings=32)),
    ),
}


def build_hf_model(config_class, overrides: dict, seed: int = 0) -> transformers.PreTrainedModel:
    config = config_class(**{**_BASE, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Qwen2's random init zeroes biases; give them values so the bias path is exercised.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(0.0, 0.1)
    return model.eval()


def hf_logits(model, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        output = model(input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask.astype(np.int64)))
    return output.logits.numpy()


def relative_error(ours, reference, mask) -> float:
    """max |ours - reference| / max |reference| over real (unpadded) positions."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.abs(ours - reference)[mask].max() / np.abs(reference[mask]).max())


def left_padded_batch() -> tuple[np.ndarray, np.ndarray]:
    """tokens int64 [B, T] and attention mask bool [B, T], left-padded with PAD_TOKEN."""
    tokens = np.random.default_rng(0).integers(3, VOCAB, (BATCH, LENGTH))
    mask = np.arange(LENGTH)[None, :] >= np.asarray(PADDING)[:, None]
    return np.where(mask, tokens, PAD_TOKEN), mask
