#!/usr/bin/env bash
# Pretrains the embedded default's shipped model, `train/demo/seer-demo-llama/` (its MODEL_CARD.md), on one GPU:
#
#   bash train/demo/pretrain_shipped.sh EXTRA_DATA WORK_DIR OUT_TAR
#
# The `seer-demo-llama` preset (train.model_source.PRESETS) from scratch with `python -m train.finetune` on the
# standard-library corpus of the running interpreter (`train.demo.corpus`: train part, with its BPE tokenizer of
# 4096 tokens) plus EXTRA_DATA (the testbed's distill_code.jsonl.gz: third-party Python packages), 2000 steps of
# 32 x 2048 tokens (131M tokens), AdamW 3e-3, warm-up 100, cosine to 3e-4, weight decay 0.1, bf16 compute with
# cuDNN attention, float32 master weights, exported in bf16. Then the held-out perplexity of the corpus's eval part
# at 512 and 2048 tokens. Everything is written under WORK_DIR; the model directory, its training metrics and the
# evaluation are packed into the one file OUT_TAR (a device machine returns few files).
set -euo pipefail
extra=$1
work=$2
out_tar=$3
mkdir -p "$work"
python3 -c "
from pathlib import Path
from train.demo.corpus import DemoCorpusConfig, build_demo_corpus
print(build_demo_corpus(DemoCorpusConfig(cache_dir=Path('$work/corpus'))))"
python3 -m train.finetune --preset seer-demo-llama --tokenizer-dir "$work/corpus/tokenizer" \
  --data "$work/corpus/train.jsonl.gz" "$extra" --corpus-cache "$work/tokens" --seq-len 2048 --batch-size 32 \
  --steps 2000 --lr 3e-3 --warmup-steps 100 --schedule cosine --min-lr 3e-4 --weight-decay 0.1 --log-every 10 \
  --out "$work/run" --checkpoint-every 1000 --keep-checkpoints 1 --export-hf "$work/seer-demo-llama" \
  --export-dtype bfloat16
python3 -m train.eval_ppl --model "$work/seer-demo-llama" --data "$work/corpus/eval.jsonl.gz" --lengths 512 2048 \
  --methods dense --num-docs 16 --out "$work/eval"
cp "$work/run/metrics.jsonl" "$work/corpus/manifest.json" "$work/seer-demo-llama/"
cp "$work/eval/results.json" "$work/seer-demo-llama/eval_results.json"
tar -C "$work" -czf "$out_tar" seer-demo-llama
echo "wrote $out_tar"
