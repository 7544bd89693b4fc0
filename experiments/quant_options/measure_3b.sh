#!/usr/bin/env bash
# Peak memory of Llama-3.2 3B `best` (simulated meter) with today's defaults and with the
# chosen quantization options, at every Table 1 context length; records under
# results/raw/quant_options/ (existing records are skipped).
set -u
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
# quality.ROWS["best_chosen"] (session 10); under the simulated meter GPTQ's codes are RTN's
CHOSEN=(--quant-codebook nf4 --quant-method gptq --quant-calib-tokens 8192
  --quant-gptq-sequential true --quant-gptq-act-order true --quant-vocab-bits 8)
SUFFIX="__quant_codebook=nf4__quant_method=gptq__quant_calib_tokens=8192__quant_gptq_sequential=True__quant_gptq_act_order=True__quant_vocab_bits=8"
# session 13's best_chosen: the same with FP16 scales in groups of 16 (the scale searches, like
# GPTQ, change only the codes, and are skipped under the simulated meter)
CHOSEN16=(--quant-group-size 16 --quant-scale-dtype fp16 "${CHOSEN[@]}")
SUFFIX16="__quant_group_size=16__quant_scale_dtype=fp16${SUFFIX}"
for T in ${SEQ_LENS:-1024 2048 4096 8192 16384}; do
  for variant in plain chosen chosen16; do
    name="llama-3.2-3b__best__T${T}__simulated"
    case $variant in
      plain) opts="" ;;
      chosen) opts="${CHOSEN[*]}"; name="${name}${SUFFIX}" ;;
      chosen16) opts="${CHOSEN16[*]}"; name="${name}${SUFFIX16}" ;;
    esac
    [ -e "results/raw/quant_options/$name.json" ] && continue  # a record is a result: skip
    [ -z "$opts" ] && [ -e "results/raw/table1/$name.json" ] && continue  # Table 1's best cell
    # shellcheck disable=SC2086
    $PY -m lowmem measure --model llama-3.2-3b --stack best --seq-len "$T" --meter simulated \
      $opts --experiment quant_options > /dev/null || echo "failed: T=$T $opts"
  done
done
