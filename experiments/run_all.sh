#!/usr/bin/env bash
# Regenerates every committed record and table (make experiments). Commands match the
# experiment READMEs. ~16 min on 2 CPU cores, peak ~17 GB RAM (the 3B cpu-meter checks).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
$PY -m lowmem table1 --force
for m in llama-3.2-3b qwen-2.5-3b; do for T in 1024 2048 4096 8192 16384; do
  $PY -m lowmem measure --model $m --stack lora --seq-len $T --gqa native --experiment gqa_ablation >/dev/null
  $PY -m lowmem measure --model $m --stack quantize --seq-len $T --gqa repeat_kv --experiment gqa_ablation >/dev/null
done; done
$PY -m lowmem table gqa_ablation >/dev/null
for p in none attention mlp all_linear; do
  for o in disk memory; do
    $PY -m lowmem measure --model llama-3.2-3b --stack checkpoint --seq-len 4096 --cache-policy $p --offload $o --experiment cache_policy >/dev/null
  done
  $PY -m lowmem measure --model smollm2-135m --stack checkpoint --seq-len 512 --meter cpu --cache-policy $p --experiment cache_policy >/dev/null
done
$PY -m lowmem speed --model smollm2-135m --stacks lora quantize --seq-len 256 --steps 5 --experiment quant_speed >/dev/null
$PY -m lowmem speed --model smollm2-135m --stacks quantize "checkpoint:offload=memory,stream_weights=false" \
    "checkpoint:offload=memory" checkpoint --seq-len 256 --steps 3 --experiment checkpoint_speed >/dev/null
$PY -m lowmem speed --model smollm2-135m --stacks lora quantize checkpoint best --seq-len 256 \
    --steps 3 --experiment best_speed >/dev/null
for stack in lora checkpoint; do
  T=$([ $stack = lora ] && echo 512 || echo 1024)
  for meter in simulated cpu; do
    MALLOC_MMAP_THRESHOLD_=131072 $PY -m lowmem measure --model llama-3.2-3b --stack $stack --seq-len $T --meter $meter --experiment meter_check >/dev/null
  done
done
