"""Tensor bytes in safetensors files, read without the library: the dtype names and an
offset read into a preallocated buffer. Shared by `lowmem.loader` (a converted directory's
row blocks) and `lowmem.offload` (the disk store's entries)."""

from __future__ import annotations

import os

import torch

DTYPES = {  # safetensors' names of the dtypes lowmem reads and writes
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "BOOL": torch.bool,
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}


def as_bytes(t: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's memory as bytes, without a copy."""
    return memoryview(t.view(-1).view(torch.uint8).numpy())


def pread_into(fd: int, out: torch.Tensor, offset: int) -> None:
    """Fill the contiguous CPU tensor `out` with the bytes of `fd` from `offset` on (one call
    per 1 GiB at most: a single read returns at most about 2 GiB on Linux)."""
    view, done = as_bytes(out), 0
    while done < len(view):
        got = os.preadv(fd, [view[done : done + 2**30]], offset + done)
        if got == 0:
            raise ValueError(f"the file ends {len(view) - done} bytes before the tensor does")
        done += got
