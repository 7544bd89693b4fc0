"""Seconds per named region of a run (dequantization, ...), summed over the whole process.

`clock(region)` costs two perf_counter calls per block it wraps (microseconds: the regions it
wraps, a dequantized block of rows, take milliseconds). `lowmem.process.ProcessWatch` reads
`REGION_S` before and after each training step, so a step's share of each region is known
without a profiler. A leaf module: the weight classes import it.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator

REGION_S: defaultdict[str, float] = defaultdict(float)  # seconds per named region, ever


@contextlib.contextmanager
def clock(region: str) -> Iterator[None]:
    """Add the seconds the block takes to REGION_S[region]."""
    start = time.perf_counter()
    try:
        yield
    finally:
        REGION_S[region] += time.perf_counter() - start
