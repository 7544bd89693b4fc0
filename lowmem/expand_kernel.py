"""Packed symmetric 4-bit codes to FP32 in one compiled pass, for tensors in CPU memory.

`lowmem.quantize` expands codes with PyTorch operations, which run on any device and under fake
tensors (the `simulated` meter), but on a CPU take several passes over memory (INT4: int32
spreading, shift, conversion, scale multiply; NF4: an int32 index and a gather) plus a Python
call per operation. A code byte c holds two codes, the first in its low nibble; the weights are
value(c & 15) x s and value(c >> 4) x s, s the FP32 scale of their group and value one of 16
FP32 numbers (INT4: the level code - 8; NF4: the normal-float table). Here that loop is
compiled with numba (LLVM): one read of each byte, one write of each weight, no temporary.
Bit for bit the PyTorch path's values (tests): one FP32 product value x s each.
Measured in a `best` step of SmolLM2-135M at 256 tokens (one thread, seconds of expansion per
step, `lowmem.timers` region "dequantize"; experiments/LOG.md, session 12): INT4 0.28 -> 0.21,
NF4 0.66 -> 0.23. Most of what is left is writing 1.4 GB of FP32 weights per step to memory.
On one 1536 x 576 piece, cache-hot: 0.25 ms, the PyTorch INT4 path 0.32 ms, NF4 1.9 ms;
bitsandbytes' CPU kernel for NF4 0.13 ms, but it stores the first code in the high nibble, so
it cannot read our format, and it has no INT4 table.

Used by `lowmem.quantize` where it can be: numba installed, codes and scales in CPU memory, and
no dispatch mode active. A compiled loop is invisible to a `TorchDispatchMode`, so under one
(the `cpu` meter's `LiveStorageTracker`, the `simulated` meter's FakeTensorMode) the PyTorch
path runs and the mode sees every operation: the meters measure that path (its transient: the
output + as many bytes as the codes, for one piece; what a CUDA device runs), so `simulated`
still equals `cpu` to the byte (SPEC), and an unmetered CPU run holds at most what they report.
On fake tensors the INT4 path allocates what it would and skips the integer work, whose values
fake tensors do not have (`lowmem.quantize._expand_int4_symmetric`). Single-threaded.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import _get_current_dispatch_mode

try:
    import numba
    import numpy as np
except ImportError:  # the PyTorch path stays
    numba = None


def usable(codes: torch.Tensor, scales: torch.Tensor) -> bool:
    """Whether `expand` can run on these tensors (else the caller's PyTorch path)."""
    return (
        numba is not None
        and _get_current_dispatch_mode() is None
        and codes.device.type == "cpu"
        and scales.dtype in (torch.float32, torch.float16)  # FP16: expanded from an FP32 copy
        and not is_fake(codes)
        and not is_fake(scales)
    )


def expand(codes: torch.Tensor, scales: torch.Tensor, values: tuple[float, ...]) -> torch.Tensor:
    """n_rows x 2 n_bytes FP32 weights of n_rows x n_bytes packed codes, one scale per group of
    n_bytes / scales.shape[1] bytes; `values`: the 16 FP32 numbers the codes stand for."""
    n_rows, n_bytes = codes.shape
    out = torch.empty(n_rows, 2 * n_bytes, dtype=torch.float32, device=codes.device)
    _expand(
        codes.contiguous().numpy().reshape(-1),
        scales.contiguous().numpy().reshape(-1),
        np.asarray(values, dtype=np.float32),
        out.numpy().reshape(-1),
        n_bytes // scales.shape[1],
    )
    return out


if numba is not None:

    @numba.njit(nogil=True, cache=False)
    def _expand(codes, scales, values, out, half):  # pragma: no cover - compiled
        for g in range(scales.shape[0]):
            s = scales[g]
            for j in range(g * half, (g + 1) * half):
                c = codes[j]
                out[2 * j] = values[c & 15] * s
                out[2 * j + 1] = values[c >> 4] * s
