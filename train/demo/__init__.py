"""The embedded demo, which needs no download: `python -m train.distill_gates` with no `--model` runs it.

corpus.py          the running interpreter's standard-library sources as train/eval documents
bpe_tokenizer.py   the byte-level BPE tokenizer trained on them
model.py           a small Llama pretrained on them (cached)
__main__.py        `python -m train.demo`: pretrain (or reuse) only the demo model
shipped.py         the shipped pretrained model `seer-demo-llama/` (package data), used instead when present
pretrain_shipped.sh  the GPU command that trains the shipped model
"""
