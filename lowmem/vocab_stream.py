"""Beyond the paper: the (tied) embedding / LM head streamed from the store in vocabulary chunks.

With layer weights streamed (`lowmem.checkpoint`), the largest resident tensor is the INT4
vocabulary table: on Llama-3.2 3B the tied 128256 x 3072 embedding / LM head is 197.0e6 B of
codes + 49.3e6 B of FP32 scales = 0.23 GiB, a third of `best`'s peak at 1024 tokens. None of
its users needs it whole at once:

- the input lookup walks the chunks of C rows and, per chunk, gathers the packed codes and
  scales of the ids that fall inside it (a `where` over all T positions: no data-dependent
  shapes, so fake tensors measure it too); the gathered T rows are dequantized once, exactly as
  `dequantize_rows` does, so the embeddings are bit-identical;
- the fused loss (`lowmem.fused_loss`) already walks the vocabulary C rows at a time, forward
  and backward: it reads each chunk from the store instead of slicing a resident table, and
  dequantizes the same bytes, so loss and gradients are bit-identical too;
- a plain call of the head (`QuantLinear.forward`, e.g. the model's own loss) runs y = x W^T
  chunk by chunk (`lowmem.weights.frozen_matmul` walks a streamed weight in its store's
  chunks); its input gradient sums over chunks (equal within FP32 rounding).

Each chunk is one store entry ("vocab{k}": codes, scales); a tied table is stored once and both
modules read the same entries. Reading chunk k prefetches chunk k + 1, so the walk overlaps disk
reads with compute; nothing stays on the device after a walk. Memory: one chunk and the
prefetched next one, 2 x (4096 x 1536 B + 4096 x 96 x 4 B) = 15.7 MB on Llama with C = 4096,
plus the lookup's gathered rows (T x (D/2 B + D/32 x 4 B): 1.9 MiB per 1024 tokens).
"""

from __future__ import annotations

import torch

from lowmem.models import base_model
from lowmem.quant_linear import QuantLinear
from lowmem.quantize import QuantizedWeight, dequantize
from lowmem.timers import clock
from lowmem.weights import FrozenWeight, PackedWeight

_PARTS = ("codes", "scales", "zeros")


class VocabStream(FrozenWeight):
    """The rows of one quantized vocabulary table, kept in `store` as entries of `chunk` rows.

    Built from the table's resident `PackedWeight`, whose tensors it hands to the store; a
    (tiny) bias stays resident. `nbytes` is the packed size as stored.
    """

    def __init__(self, packed: PackedWeight, store, key: str, chunk: int) -> None:
        if chunk <= 0:
            raise ValueError(f"bad vocab chunk={chunk}: must be > 0")
        self._nbytes = packed.nbytes
        tensors = packed.offload()
        super().__init__(packed.shape, tensors.pop("bias", None))
        self.store, self.key, self.row_block = store, key, chunk
        self.n_rows, self.d = packed.shape
        self.fmt = (packed.bits, packed.group_size, packed.codebook)
        for k, a in enumerate(range(0, self.n_rows, chunk)):
            store.put(f"{key}{k}", {p: t[a : a + chunk] for p, t in tensors.items()})

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def _load(self, k: int) -> QuantizedWeight:
        entry = self.store.get(f"{self.key}{k}", keep=True)
        if (k + 1) * self.row_block < self.n_rows:
            self.store.prefetch(f"{self.key}{k + 1}")  # read the next chunk while this one works
        codes = entry["codes"]
        shape = (codes.shape[0], self.d)
        return QuantizedWeight(codes, entry["scales"], entry.get("zeros"), shape, *self.fmt)

    def _chunks(self):
        for k, a in enumerate(range(0, self.n_rows, self.row_block)):
            yield a, self._load(k)

    def rows_from(self, tensors, start: int, stop: int) -> torch.Tensor:
        """FP32 rows start:stop, (stop - start) x D, read from the chunks that hold them
        (nothing is resident: `tensors` is empty)."""
        chunk, parts = self.row_block, []
        for k in range(start // chunk, -(-stop // chunk)):
            a, qw = k * chunk, self._load(k)
            with clock("dequantize"):
                parts.append(qw.rows(max(start - a, 0), min(stop - a, qw.shape[0])))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows of `ids` (any shape): ... x D; only the gathered rows dequantize."""
        flat = ids.reshape(-1)
        gathered: dict[str, torch.Tensor] = {}
        for a, qw in self._chunks():
            inside = ((flat >= a) & (flat < a + qw.shape[0]))[:, None]
            local = (flat - a).clamp(0, qw.shape[0] - 1)
            for p in _PARTS:
                t = getattr(qw, p)
                if t is not None:
                    rows = t[local]
                    gathered[p] = torch.where(inside, rows, gathered[p]) if a else rows
        shape = (flat.shape[0], self.d)
        qw = QuantizedWeight(
            gathered["codes"], gathered["scales"], gathered.get("zeros"), shape, *self.fmt
        )
        with clock("dequantize"):
            return dequantize(qw).reshape(*ids.shape, self.d)


def stream_vocab(model: torch.nn.Module, store, chunk: int) -> list[VocabStream]:
    """Move the quantized embedding and LM head of `model` into `store`; a tied table once.

    Needs `lowmem.quant_linear.apply_quantize` first: the tables must be resident packed."""
    base = base_model(model)
    tables = {}
    for name, module in (
        ("vocab", getattr(base.get_input_embeddings(), "linear", None)),
        ("head", base.get_output_embeddings()),
    ):
        if not (isinstance(module, QuantLinear) and isinstance(module.frozen, PackedWeight)):
            raise ValueError(
                f"vocabulary streaming needs a quantized, resident {name} table (a QuantLinear "
                f"from apply_quantize); got {type(module).__name__}"
            )
        tables.setdefault(id(module), (name, module))  # tied: the head is the embedding's
    streams = []
    for name, q in tables.values():
        streams.append(VocabStream(q.frozen, store, name, chunk))
        q.use_weight(streams[-1])
    return streams
