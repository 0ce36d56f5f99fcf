#!/usr/bin/env bash
# The testbed acceptance runs of BENCHMARKS.md (issues 5 and 7), one stage per call so each fits a device command:
#
#   bash benchmarks/testbed_acceptance.sh TESTBED RUN_DIR STAGE...
#
# Stages, in order (each reads what the earlier ones wrote under RUN_DIR):
#   distill    gates for seer-tiny-llama on distill_code at 8192 tokens (docs/design.md §5)
#   eval       PPL vs. density on eval_stdlib at L = 2048, 8192: dense, gate (TopK and thresholds), baselines
#   yarn-dense YaRN 8k -> 32k fine-tuning, dense attention (docs/design.md §5, the baseline)
#   yarn-seer  the same with SeerAttention at nz_ratio 0.5, gates initialised from `distill`
#   eval32k-dense  PPL at 32k of the dense-YaRN model
#   eval32k-seer   PPL at 32k of the SeerAttention-YaRN model: dense, its gates and the oracle at 0.5/0.3/0.1
#   distill-decode SeerAttention-R decode gates, same data and length (`--target decode`, the official recipe)
#   eval-decode    decode-mode PPL (issue 17's protocol): the last DECODE_CONTINUATION tokens of each L = 8192
#                  window by teacher-forced decode steps; dense, decode gates, oracle, Quest, StreamingLLM, random at
#                  token budgets and context fractions; with `distill` run first, also prefill gates + decode gates
#
# Sizes come from the environment so the same script smoke-tests on a CPU (tiny values) and runs on the H200
# (the defaults below). The fine-tuning recipe is docs/design.md §5's shape (YaRN factor 4 from 8192, linear schedule,
# warmup 20, remat) scaled to a 26M-parameter model: 200 steps x 4 rows x 32768 tokens at lr 5e-5. The testbed
# has Llama-3.1 (`llama3`) RoPE, which YaRN replaces (--yarn-replace-scaling).
set -euo pipefail
testbed=$1
run=$2
shift 2

model=$testbed/seer-tiny-llama
distill_data=$testbed/data/distill_code.jsonl.gz
eval_data=$testbed/data/eval_stdlib.jsonl.gz
cache=$run/cache

: "${DISTILL_SEQ:=8192}" "${DISTILL_BATCH:=8}" "${DISTILL_STEPS:=400}" "${WARMUP:=20}"
: "${EVAL_LENGTHS:=2048 8192}" "${EVAL_DOCS:=16}" "${EVAL_BATCH:=8}"
: "${YARN_SEQ:=32768}" "${YARN_ORIGINAL:=8192}" "${YARN_BATCH:=4}" "${YARN_STEPS:=200}" "${YARN_LR:=5e-5}"
: "${LONG_LENGTH:=32768}" "${LONG_BATCH:=2}"
: "${DECODE_STEPS:=400}" "${DECODE_LENGTH:=8192}" "${DECODE_CONTINUATION:=2048}" "${DECODE_BATCH:=8}"
: "${DECODE_TAG:=}" "${DECODE_BUDGETS:=256 512 1024 2048 5% 10% 25%}" "${DECODE_METHODS:=}"  # empty: every method

yarn_common=(--data "$distill_data" --corpus-cache "$cache" --seq-len "$YARN_SEQ" --batch-size "$YARN_BATCH"
  --steps "$YARN_STEPS" --lr "$YARN_LR" --warmup-steps "$WARMUP" --schedule linear --remat
  --yarn-factor 4 --yarn-original-max-positions "$YARN_ORIGINAL" --yarn-replace-scaling --checkpoint-every "$YARN_STEPS")

long=(--data "$eval_data" --cache-dir "$cache" --lengths "$LONG_LENGTH" --num-docs "$EVAL_DOCS"
  --batch-size "$LONG_BATCH")

for stage in "$@"; do
  echo "=== $stage ($(date -u +%H:%M:%S))"
  case $stage in
    distill)
      python -m train.distill_gates --model "$model" --data "$distill_data" --corpus-cache "$cache" \
        --seq-len "$DISTILL_SEQ" --batch-size "$DISTILL_BATCH" --steps "$DISTILL_STEPS" \
        --warmup-steps "$WARMUP" --checkpoint-every "$DISTILL_STEPS" --out "$run/distill" ;;
    eval)
      # shellcheck disable=SC2086  # the lengths are a list
      python -m train.eval_ppl --model "$model" --gates "$run/distill/adapter" --data "$eval_data" \
        --cache-dir "$cache" --lengths $EVAL_LENGTHS --num-docs "$EVAL_DOCS" --batch-size "$EVAL_BATCH" \
        --nz-ratios 0.5 0.3 0.2 0.1 --thresholds 0.003 0.01 0.02 0.03 0.05 0.1 --out "$run/eval" ;;
    yarn-dense)
      python -m train.finetune --model "$model" "${yarn_common[@]}" --out "$run/yarn-dense" ;;
    yarn-seer)
      python -m train.finetune --model "$model" "${yarn_common[@]}" --seer-gates "$run/distill/adapter" \
        --nz-ratio 0.5 --out "$run/yarn-seer" ;;
    eval32k-dense)
      python -m train.eval_ppl --model "$run/yarn-dense/model" "${long[@]}" --methods dense \
        --out "$run/eval32k-dense-yarn" ;;
    eval32k-seer)
      python -m train.eval_ppl --model "$run/yarn-seer/model" --gates "$run/yarn-seer/adapter" "${long[@]}" \
        --methods dense gate oracle --nz-ratios 0.5 0.3 0.1 --out "$run/eval32k-seer-yarn" ;;
    distill-decode)
      python -m train.distill_gates --target decode --model "$model" --data "$distill_data" --corpus-cache "$cache" \
        --seq-len "$DISTILL_SEQ" --batch-size "$DISTILL_BATCH" --steps "$DECODE_STEPS" \
        --checkpoint-every "$DECODE_STEPS" --out "$run/distill-decode" ;;
    eval-decode)
      gates=(--gates "$run/distill-decode/adapter")
      if [ -d "$run/distill/adapter" ]; then  # one adapter with both gates, for the prefill + decode rows
        rm -rf "$run/both-gates"
        python - "$model" "$run/distill/adapter" "$run/distill-decode/adapter" "$run/both-gates" <<'PY'
import sys

from seer_jax.adapters import attach_gates, combine_adapters, read_adapter, save_adapter
from seer_jax.checkpoint import load_model

model, prefill, decode, out = sys.argv[1:]
base, _ = load_model(model)
both = attach_gates(base, combine_adapters(read_adapter(prefill), read_adapter(decode)))
save_adapter(both, out, base_model=model, weights="safetensors")
PY
        gates=(--gates "$run/both-gates" --decode-prefill nz_ratio=0.2)
      fi
      # shellcheck disable=SC2086  # the budgets are a list
      python -m train.eval_ppl --mode decode --model "$model" "${gates[@]}" --data "$eval_data" --cache-dir "$cache" \
        --lengths "$DECODE_LENGTH" --continuation "$DECODE_CONTINUATION" --num-docs "$EVAL_DOCS" \
        --batch-size "$DECODE_BATCH" --decode-budgets $DECODE_BUDGETS ${DECODE_METHODS:+--methods $DECODE_METHODS} --out "$run/eval-decode${DECODE_TAG:-}" ;;
    *)
      echo "unknown stage: $stage" >&2
      exit 2 ;;
  esac
done
