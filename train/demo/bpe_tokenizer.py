"""Training a small byte-level BPE tokenizer, saved so that `transformers.AutoTokenizer` loads it offline.

The layout copies the testbed tokenizer (`seer-tiny-llama/tokenizer.json`): byte-level pre-tokenizer without
a prefix space, byte-level decoder, and the special tokens `<|bos|>`, `<|eos|>`, `<|pad|>` at ids 0, 1, 2. Like
the testbed tokenizer it adds no special tokens when encoding; the data pipeline places BOS and EOS itself.
Byte-level means every string round-trips through encode and decode, whatever its characters.
"""

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")


def train_bpe_tokenizer(texts: Iterable[str], *, vocab_size: int, out_dir: Path) -> PreTrainedTokenizerFast:
    """Trains on `texts` and writes `tokenizer.json` and `tokenizer_config.json` into `out_dir`.

    `vocab_size` counts the 3 special tokens and the 256 byte symbols, so it must exceed 259. Training is
    deterministic for the same texts in the same order.
    """
    min_vocab = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size <= min_vocab:
        raise ValueError(f"vocab_size: {vocab_size} leaves no room for merges (must exceed {min_vocab})")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    bos, eos, pad = SPECIAL_TOKENS
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, pad_token=pad)
    wrapped.save_pretrained(str(out_dir))
    return wrapped
