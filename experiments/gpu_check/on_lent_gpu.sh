#!/usr/bin/env bash
# `make gpu-check` on a lent GPU machine that cannot reach a package index: its own python3
# holds torch with CUDA, and our pinned transformers / peft come as wheels in $WHEELS
# (downloaded beforehand: experiments/gpu_check/README.md). Installs them into a scratch
# folder, runs the cuda-meter test on a tiny model, then the cuda meter on every gpu_check
# cell (--long: the long-context rows too); leaves the log, versions and records under $OUT.
set -uo pipefail
OUT=${OUT:?set OUT to the folder that comes back}
WHEELS=${WHEELS:-.gpu/wheels}
LIMIT=${LIMIT:-480}  # seconds for the 3B cells; what is recorded by then comes back
SITE=$(mktemp -d)
python3 -m pip install --quiet --no-deps --no-index --target "$SITE" "$WHEELS"/*.whl || exit 1
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import sys, torch, transformers, peft; print(sys.version.split()[0], \
torch.__version__, torch.version.cuda, transformers.__version__, peft.__version__)"
} 2>&1 | tee "$OUT/versions.txt"
[ -n "${SKIP_PYTEST:-}" ] || timeout 120 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_memory.py 2>&1 |
    tee "$OUT/pytest_cuda.log" | tail -n 15
timeout "$LIMIT" python3 -m lowmem.gpu_check --meters cuda --long "$@" 2>&1 |
    tee "$OUT/gpu_check.log" | grep -v "it/s\]$"
tar czf "$OUT/gpu_check_records.tgz" results/raw/gpu_check
