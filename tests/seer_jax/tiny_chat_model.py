"""A tiny chat model on disk for the generation and converter tests: a byte-level BPE tokenizer with a chat template
(saved by `transformers`, so the template lands where it puts it), a generation_config.json, and a random tiny
Llama as a Hugging Face directory. Built in a second or two, no network, no `../shared`.
"""

import json
from pathlib import Path

from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from seer_jax.config import ModelConfig
from seer_jax.hf_export import save_hf
from seer_jax.model import CausalLM
from tests.seer_jax.tiny_models import random_module

BOS, EOS, PAD, IM_START, IM_END = "<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, IM_START, IM_END)  # ids 0 .. 4
EOS_ID, IM_END_ID = 1, 4
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXT = (
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "The quick brown fox jumps over the lazy dog. Sparse attention computes only the blocks that matter.",
    "class Stack:\n    def __init__(self):\n        self.items = []\n"
    "    def push(self, item):\n        self.items.append(item)\n",
)


def write_chat_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    """Trains a ~300-token byte-level BPE on `TEXT` (its alphabet only: every token decodes to valid UTF-8) and saves
    it with `CHAT_TEMPLATE` and a generation_config.json whose EOS tokens are <|eos|> and <|im_end|>."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    tokenizer.train_from_iterator(TEXT * 4, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(str(directory))
    generation = {"bos_token_id": 0, "eos_token_id": [EOS_ID, IM_END_ID], "pad_token_id": 2}
    (directory / "generation_config.json").write_text(json.dumps(generation) + "\n")
    return wrapped


def hf_config(vocab_size: int) -> dict:
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 1,  # one layer: compiling is most of the generation tests' time
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": EOS_ID,
        "pad_token_id": 2,
    }


def write_tiny_chat_model(directory: Path, seed: int = 0) -> Path:
    """A random tiny Llama (float32 safetensors) with the chat tokenizer, as a Hugging Face directory."""
    tokenizer_dir = directory.parent / f".{directory.name}-tokenizer"
    tokenizer_dir.mkdir(parents=True)
    tokenizer = write_chat_tokenizer(tokenizer_dir)
    config = hf_config(len(tokenizer))
    model = random_module(lambda: CausalLM(ModelConfig.from_hf(config), rngs=nnx.Rngs(0)), seed, weight_std=0.2)
    save_hf(model, config, directory, dtype="float32", copy_from=tokenizer_dir)
    return directory
