#!/usr/bin/env bash
# GPU checks on a lent GPU machine that cannot reach a package index: its own python3 holds
# torch with CUDA, and our pinned transformers / peft (and, for the peers, cut-cross-entropy and
# bitsandbytes) come as wheels in $WHEELS (downloaded beforehand: experiments/gpu_check/README.md).
# Installs them into a scratch folder, prints versions, then runs each step under its own time
# limit and packs the records after each one, so that what a step measured comes back even when
# a later one runs out of time. Leaves log.txt, versions.txt and records.tgz in $OUT.
#
#     OUT=folder bash experiments/gpu_check/on_lent_gpu.sh [SECONDS 'COMMAND' ...]
#
# Without steps: the cuda-meter tests on a tiny model, then the cuda meter on every gpu_check
# cell (--long: the long-context rows too) within $LIMIT seconds.
set -uo pipefail
OUT=${OUT:?set OUT to the folder that comes back}
WHEELS=${WHEELS:-.gpu/wheels}
LIMIT=${LIMIT:-480}
SITE=$(mktemp -d)
python3 -m pip install --quiet --no-deps --no-index --no-compile --target "$SITE" "$WHEELS"/*.whl ||
    exit 1
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import sys, torch, transformers, peft; print(sys.version.split()[0], \
torch.__version__, torch.version.cuda, transformers.__version__, peft.__version__)"
    python3 -m pip list 2>/dev/null | grep -iE "^(triton|bitsandbytes|cut.cross.entropy) "
} 2>&1 | tee "$OUT/versions.txt"

step() {  # step SECONDS COMMAND: run it with a limit, log it, pack the records so far
    local limit=$1 command=$2 start=$SECONDS
    echo "== $command (limit ${limit} s)" | tee -a "$OUT/log.txt"
    timeout "$limit" bash -c "$command" 2>&1 | tr '\r' '\n' | grep --line-buffered -v "it/s\]$" |
        tee -a "$OUT/log.txt" | tail -n 25
    echo "== exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$OUT/log.txt"
    tar czf "$OUT/records.tgz" results/raw/gpu_check results/raw/peers results/tables 2>/dev/null
}

if [ $# -eq 0 ]; then
    set -- 120 "python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_memory.py" \
        "$LIMIT" "python3 -m lowmem.gpu_check --meters cuda --long"
fi
while [ $# -ge 2 ]; do
    step "$1" "$2"
    shift 2
done
