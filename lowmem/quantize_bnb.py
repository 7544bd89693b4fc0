"""bitsandbytes as a second quantization backend: NF4 / FP4 `matmul_4bit`, CPU, CUDA, fake.

Same contract as `lowmem.quant_linear.QuantLinear`: a frozen 4-bit weight that bitsandbytes
dequantizes whole for each matmul and again in backward. Storage: 4-bit codes + one FP32
absmax per block of 64 weights = 0.5 + 4/64 = 0.5625 bytes per weight. Double quantization
(`compress_statistics`) is off: its statistics are data-dependent, which fake tensors (the
`simulated` meter) cannot express. The packed weight is a plain uint8 buffer rather than bnb's
`Params4bit`, which cannot wrap a fake tensor. bitsandbytes has no 4-bit embedding, so the
embedding / LM head stay on lowmem's own INT4 format.
"""

from __future__ import annotations

import torch

BNB_TYPES = {"bnb-nf4": "nf4", "bnb-fp4": "fp4"}
BLOCKSIZE = 64


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
        self.quant_state = state
        self.register_buffer("packed", packed)
        self.register_buffer("absmax", state.absmax)  # the same tensor, so state_dict counts it
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())
        self._matmul = bnb.matmul_4bit

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.absmax))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.packed.t(), bias=self.bias, quant_state=self.quant_state)


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
