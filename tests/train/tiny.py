"""A tiny Llama and a synthetic corpus it can learn quickly, for the training-loop tests; `write_docs` for the tests
that read real text from a file."""

import gzip
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from flax import nnx

from seer_jax.config import ModelConfig
from seer_jax.model import CausalLM
from train.data import LoaderConfig, LoaderState, PackedLoader
from train.token_corpus import TokenizedCorpus

VOCAB, BOS, EOS = 64, 0, 1
TINY_HF_CONFIG = {
    "model_type": "llama",
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "bos_token_id": BOS,
    "eos_token_id": EOS,
}
LOADER = LoaderConfig(seq_len=64, batch_size=4, seed=0)


def tiny_model(seed: int = 0) -> CausalLM:
    return CausalLM(ModelConfig.from_hf(TINY_HF_CONFIG), rngs=nnx.Rngs(seed))


def synthetic_corpus(num_docs: int = 48, seed: int = 0) -> TokenizedCorpus:
    """Documents `BOS body EOS` of 20-200 tokens; a body token is followed by its successor under a fixed random
    permutation with probability 0.8, else by a random token: learnable structure, never a constant.
    """
    rng = np.random.default_rng(seed)
    successor = rng.permutation(np.arange(2, VOCAB))
    docs = []
    for _ in range(num_docs):
        body = [int(rng.integers(2, VOCAB))]
        for _ in range(int(rng.integers(20, 200))):
            body.append(int(successor[body[-1] - 2]) if rng.random() < 0.8 else int(rng.integers(2, VOCAB)))
        docs.append(np.array([BOS, *body, EOS]))
    lengths = [len(doc) for doc in docs]
    return TokenizedCorpus(
        tokens=np.concatenate(docs).astype(np.int32),
        doc_starts=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        bos_id=BOS,
        eos_id=EOS,
    )


def loader_factory(corpus: TokenizedCorpus, config: LoaderConfig = LOADER):
    return lambda state: PackedLoader(corpus, config, state=state or LoaderState())


def write_docs(path: Path, docs: Iterable[tuple[str, str]]) -> Path:
    """Writes (name, text) documents as a gzipped JSON-lines corpus (one {"name", "text"} object per line)."""
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for name, text in docs:
            f.write(json.dumps({"name": name, "text": text}) + "\n")
    return path
