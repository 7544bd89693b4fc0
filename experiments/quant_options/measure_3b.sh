#!/usr/bin/env bash
# Peak memory of Llama-3.2 3B `best` (simulated meter) with today's defaults and with the
# chosen quantization options, at every Table 1 context length; records under
# results/raw/quant_options/ (existing records are skipped).
set -u
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
CHOSEN=(--quant-codebook nf4 --quant-method gptq --quant-loftq-iters 1 --quant-vocab-bits 8)
for T in ${SEQ_LENS:-1024 2048 4096 8192 16384}; do
  for opts in "" "${CHOSEN[*]}"; do
    name="llama-3.2-3b__best__T${T}__simulated"
    [ -n "$opts" ] && name="${name}__quant_codebook=nf4__quant_method=gptq__quant_loftq_iters=1__quant_vocab_bits=8"
    [ -e "results/raw/quant_options/$name.json" ] && continue  # a record is a result: skip
    # shellcheck disable=SC2086
    $PY -m lowmem measure --model llama-3.2-3b --stack best --seq-len "$T" --meter simulated \
      $opts --experiment quant_options > /dev/null || echo "failed: T=$T $opts"
  done
done
