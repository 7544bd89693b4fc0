"""Time to expand one packed 4-bit piece to FP32, per codebook: the path `dequantize` takes and
the PyTorch functions behind it (one thread, real tensors, min and median of `--repeats` calls).

    OMP_NUM_THREADS=1 python experiments/quant_speed/expand_pieces.py [--rows 1536 --cols 576]

Run it at two commits (e.g. `git worktree`) to compare expansions; experiments/LOG.md, session 16.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lowmem import quantize as q


def timed(fn, repeats: int) -> str:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - start)
    return f"min {min(ts) * 1e3:.3f} ms, median {statistics.median(ts) * 1e3:.3f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1536)
    parser.add_argument("--cols", type=int, default=576)
    parser.add_argument("--group", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    w = torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(0))
    for codebook in q.CODEBOOKS:
        qw = q.quantize(w, 4, args.group, codebook=codebook)
        print(f"{codebook} dequantize: {timed(lambda qw=qw: q.dequantize(qw), args.repeats)}")
    qw = q.quantize(w, 4, args.group, codebook="nf4")
    nf4 = timed(lambda: q._expand_nf4(qw.codes, qw.scales, qw.group_size), args.repeats)
    print(f"nf4 _expand_nf4 (PyTorch): {nf4}")
    qw = q.quantize(w, 4, args.group)
    int4 = timed(lambda: q._expand_codes(qw.codes, qw.scales, None, 4, qw.group_size), args.repeats)
    print(f"int _expand_codes (PyTorch): {int4}")


if __name__ == "__main__":
    main()
