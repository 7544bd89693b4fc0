#!/usr/bin/env bash
# Re-measures every committed record, then rebuilds every table and figure (make experiments).
# Grids run through papermill (one kernel per cell, ~10 s each): ~150 cells, ~1 h on 2 CPU
# cores; the 3B cpu-meter checks at the end peak at ~17 GB RAM.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
for grid in experiments/*/grid.yaml; do
  $PY -m lowmem grid "$(dirname "$grid")" --force
done
# step times on one thread: on this 2-core VM two threads parallelise the matmuls but not the
# Python and I/O around them, and the run-to-run spread is larger (experiments/LOG.md)
export OMP_NUM_THREADS=1
$PY -m lowmem speed --model smollm2-135m --stacks lora quantize --seq-len 256 --steps 5 --experiment quant_speed >/dev/null
$PY -m lowmem speed --model smollm2-135m --stacks quantize "checkpoint:offload=memory,stream_weights=false" \
    "checkpoint:offload=memory" checkpoint --seq-len 256 --steps 3 --experiment checkpoint_speed >/dev/null
$PY -m lowmem speed --model smollm2-135m --stacks lora quantize checkpoint best --seq-len 256 \
    --steps 3 --experiment best_speed >/dev/null
# best's MLP-first backward and per-head RoPE, interleaved with lora and the stock recipe
$PY experiments/peers/speed.py --rows lora best best:mlp_first=off,rope=stock \
    best:mlp_first=recompute hf-qlora --seq-len 256 1024 --repeats 5 --experiment mlp_first >/dev/null
unset OMP_NUM_THREADS
for stack in lora checkpoint; do
  T=$([ $stack = lora ] && echo 512 || echo 1024)
  for meter in simulated cpu; do
    MALLOC_MMAP_THRESHOLD_=131072 $PY -m lowmem measure --model llama-3.2-3b --stack $stack --seq-len $T --meter $meter --experiment meter_check >/dev/null
  done
done
# the whole process beside the step: a 3B best step's setup (FP32 build + quantize) vs its step
OMP_NUM_THREADS=1 MALLOC_MMAP_THRESHOLD_=131072 $PY -m lowmem measure --model llama-3.2-3b \
    --stack best --seq-len 1024 --meter cpu --experiment process_check >/dev/null
# a directory loaded a tensor at a time (lowmem.loader): its tracked peak vs the FP32 weights
$PY experiments/loader_check/measure.py >/dev/null
# the one-time conversion: bytes per parameter and its tracked peak (lowmem.convert)
$PY experiments/convert_check/measure.py >/dev/null
make --no-print-directory tables
