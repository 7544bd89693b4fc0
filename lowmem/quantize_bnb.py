"""bitsandbytes as a second quantization backend: NF4 / FP4 `matmul_4bit`, CPU, CUDA, fake.

Same contract as `lowmem.quant_linear.QuantLinear`: a frozen 4-bit weight that bitsandbytes
dequantizes whole for each matmul and again in backward. Storage: 4-bit codes + one FP32
absmax per block of 64 weights = 0.5 + 4/64 = 0.5625 bytes per weight. Double quantization
(`compress_statistics`) is off: its statistics are data-dependent, which fake tensors (the
`simulated` meter) cannot express. The packed weight is a plain uint8 buffer rather than bnb's
`Params4bit`, which cannot wrap a fake tensor. bitsandbytes has no 4-bit embedding, so the
embedding / LM head stay on lowmem's own INT4 format. The weight is a `Bnb4bitWeight`
(`lowmem.weights`), so a merge, a cached activation's replay and weight streaming read it
like any other; the matmul itself stays bitsandbytes' `matmul_4bit` (its own backward).
"""

from __future__ import annotations

import torch

from lowmem.weights import FrozenWeight

BNB_TYPES = {"bnb-nf4": "nf4", "bnb-fp4": "fp4"}
BLOCKSIZE = 64


class Bnb4bitWeight(FrozenWeight):
    """A bitsandbytes 4-bit weight: packed codes + absmax, described by bnb's `quant_state`.

    Rows dequantize the whole matrix (bnb's blocks run along the flattened weight) and slice it.
    Streamed, `quant_state.absmax` follows the loaded tensor, so a released weight is gone.
    """

    parts = ("packed", "absmax")

    def __init__(self, packed, quant_state, shape, bias: torch.Tensor | None = None) -> None:
        super().__init__(shape, bias)
        self.quant_state = quant_state
        self.register_buffer("packed", packed)
        self.register_buffer("absmax", quant_state.absmax)  # the same tensor: counted once

    def rows_from(self, tensors, start: int, stop: int) -> torch.Tensor:
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(tensors[0], self.quant_state).float()[start:stop]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.absmax))

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load(tensors)
        self.quant_state.absmax = self.absmax

    def release(self) -> None:
        super().release()
        self.quant_state.absmax = None


class BnbLinear4bit(torch.nn.Module):
    def __init__(self, linear: torch.nn.Linear, backend: str) -> None:
        super().__init__()
        bnb = _import_bnb(backend)
        try:
            packed, state = bnb.functional.quantize_4bit(
                linear.weight.detach(),
                blocksize=BLOCKSIZE,
                compress_statistics=False,
                quant_type=BNB_TYPES[backend],
            )
        except (RuntimeError, NotImplementedError) as err:
            raise RuntimeError(
                f"quant_backend={backend!r} does not run on "
                f"{linear.weight.device}: {err}; use quant_backend='lowmem'"
            ) from err
        self.out_features, self.in_features = linear.weight.shape
        self.frozen = Bnb4bitWeight(packed, state, linear.weight.shape, linear.bias)
        self._matmul = bnb.matmul_4bit

    @property
    def packed(self) -> torch.Tensor:
        return self.frozen.packed

    @property
    def quant_state(self):
        return self.frozen.quant_state

    @property
    def bias(self) -> torch.Tensor | None:
        return self.frozen.bias

    @property
    def nbytes(self) -> int:
        return self.frozen.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.frozen
        w.tensors()  # a released (streamed) weight says so here
        return self._matmul(x, w.packed.t(), bias=w.bias, quant_state=w.quant_state)


def _import_bnb(backend: str):
    if backend not in BNB_TYPES:
        raise ValueError(f"bad quant_backend={backend!r}: must be one of {tuple(BNB_TYPES)}")
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401
    except ImportError as err:
        raise RuntimeError(
            f"quant_backend={backend!r} needs bitsandbytes, which does not import "
            f"here: {err}; use quant_backend='lowmem'"
        ) from err
    return bitsandbytes
