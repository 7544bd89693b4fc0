"""Replaying random numbers in a recompute: dropout must drop the same units twice.

Checkpointing and the tiled MLP run a forward under no_grad and run it again in backward. With
LoRA dropout active, the second run would draw new masks and back-propagate through a different
function than the loss saw. `saved_rng(module)` keeps the generator state a forward started from
(only when `module` holds an active dropout, so exact runs without dropout allocate nothing
extra), and `replayed_rng(state)` runs the recompute from that state without disturbing the
generator's own sequence (as `torch.utils.checkpoint` does with `preserve_rng_state`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def saved_rng(module: torch.nn.Module, device: torch.device) -> tuple | None:
    """The CPU (and CUDA) generator states, if `module` draws random numbers in this forward."""
    if not any(
        isinstance(m, torch.nn.Dropout) and m.p > 0 and m.training for m in module.modules()
    ):
        return None
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda, device


@contextlib.contextmanager
def replayed_rng(state: tuple | None) -> Iterator[None]:
    """Run the block from a saved state; the generators continue afterwards as before."""
    if state is None:
        yield
        return
    cpu, cuda, device = state
    with torch.random.fork_rng(devices=[device] if cuda is not None else []):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield
