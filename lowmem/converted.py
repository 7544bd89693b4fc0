"""A converted directory: a model's quantized weights, written once, loaded as they are.

`lowmem.convert` writes one from a Hugging Face directory; `lowmem.loader.load_quantized`
recognises it by its manifest and reads the packed tensors straight from its shards: no BF16
checkpoint to read, nothing to quantize, the same model bit for bit (the codes are those the
loader computes, `lowmem.loader.quantize_by_rows`). What a converted directory holds:

- `lowmem.json`, the manifest: format and version, the quantization settings (bits, group size,
  symmetric), the resolved lowmem configuration it was converted under, the source directory
  (path and `lowmem.models.weights_identity` hash), parameter and byte counts, and the
  environment (lowmem and library versions, commit);
- `lowmem-00001-of-0000N.safetensors` + `lowmem.safetensors.index.json` (a `weight_map` as in
  Hugging Face's index): for every 2-D weight W of the model (decoder linears, embedding,
  untied head; a tied head is the embedding) the tensors `W.codes` (uint8, D_out x D_in / 2 for
  INT4), `W.scales` (FP32, D_out x G) and, asymmetric only, `W.zeros` (FP32, D_out x G); every
  1-D parameter (norms, biases) in FP32 under its own name;
- `config.json` as in the source, and the tokenizer and generation files the source has.

The shards are not named `model*.safetensors`, so `from_pretrained` finds no weights rather than
wrong ones, and `lowmem.models.load_from_directory` refuses the directory in one line.

Size, INT4 g32 symmetric: 0.625 B per quantized weight (`lowmem.quantize`) + 4 B per 1-D
parameter: Llama-3.2 3B, 3.213e9 parameters of which 1.8e5 in norms, 2.008e9 B (1.87 GiB)
instead of 6.43e9 B of BF16. A converted directory loads only under the quantization settings
it was written with; another profile's settings are refused naming both.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from lowmem.config import Techniques
from lowmem.models import ModelError
from lowmem.quantize import QuantizedWeight, check_format

MANIFEST = "lowmem.json"
INDEX = "lowmem.safetensors.index.json"
FORMAT = "lowmem-quantized"
VERSION = 1


def quant_settings(cfg: Techniques) -> dict:
    """The settings that decide the stored bytes, as the manifest records them."""
    return {
        "bits": cfg.quant.bits,
        "group_size": cfg.quant.group_size,
        "symmetric": cfg.quant.symmetric,
    }


def packed_shapes(shape: tuple[int, ...], quant: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """{tensor suffix: (shape, safetensors dtype)} of a parameter as converted: a 2-D weight as
    codes + scales (+ zeros), a 1-D one as itself in FP32."""
    if len(shape) == 1:
        return {"": (tuple(shape), "F32")}
    group = check_format(tuple(shape), quant["bits"], quant["group_size"])
    d_out, d_in = shape
    groups = (d_out, d_in // group)
    out = {".codes": ((d_out, d_in * quant["bits"] // 8), "U8"), ".scales": (groups, "F32")}
    if not quant["symmetric"]:
        out[".zeros"] = (groups, "F32")
    return out


def packed_bytes(shape: tuple[int, ...], quant: dict) -> int:
    """Bytes a parameter of `shape` takes converted."""
    size = {"U8": 1, "F32": 4}
    return sum(
        size[dtype] * torch.Size(s).numel() for s, dtype in packed_shapes(shape, quant).values()
    )


def expected_tensors(shapes: dict[str, tuple], quant: dict) -> dict[str, tuple]:
    """{key: (shape, (dtype,))} of every tensor the shards of a converted model must hold."""
    return {
        name + suffix: (shape, (dtype,))
        for name, param_shape in shapes.items()
        for suffix, (shape, dtype) in packed_shapes(param_shape, quant).items()
    }


def read_manifest(path: Path) -> dict | None:
    """The manifest of a converted directory; None for any other directory."""
    file = path / MANIFEST
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text())
        kind, version = manifest["format"], manifest["format_version"]
        quant = manifest["quantization"]
        missing = [k for k in ("bits", "group_size", "symmetric") if k not in quant]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ModelError(f"bad manifest {str(file)!r}: {err!r}") from err
    if kind != FORMAT or version != VERSION or missing:
        raise ModelError(
            f"bad manifest {str(file)!r}: format={kind!r}, format_version={version!r}; this "
            f"lowmem reads format={FORMAT!r}, format_version={VERSION} with bits, group_size "
            "and symmetric: convert the model again"
        )
    return manifest


def refuse_whole(path: Path) -> None:
    """A converted directory holds quantized weights only: nothing to load whole in FP32."""
    if (path / MANIFEST).is_file():
        raise ModelError(
            f"model_path {str(path)!r} is a converted directory ({MANIFEST}, written by "
            "lowmem convert): its weights are quantized; load it under a profile that "
            "quantizes with the lowmem backend (quantize, checkpoint, softmax_approx, "
            "logits_mask, best), or load the original directory"
        )


def check_loadable(path: Path, cfg: Techniques) -> dict | None:
    """The manifest of a converted directory that `cfg` can load (None when `path` is not
    one); refused, before any weight is read, under a row that would load it whole or under
    quantization settings other than those it was converted with (naming both)."""
    if not (cfg.enabled("quantize") and cfg.quant.backend == "lowmem"):
        refuse_whole(path)
        return None
    manifest = read_manifest(path)
    if manifest is None:
        return None
    stored, asked = manifest["quantization"], quant_settings(cfg)
    if stored != asked:
        raise ModelError(
            f"{str(path / MANIFEST)!r} holds weights quantized with {_settings(stored)}; the "
            f"profile {cfg.stack!r} asks for {_settings(asked)}: load it with its settings, "
            "or convert the original directory again with these"
        )
    return manifest


def _settings(quant: dict) -> str:
    return ", ".join(f"quant_{k}={quant[k]!r}" for k in ("bits", "group_size", "symmetric"))


def unpacker(
    read: Callable[[str], torch.Tensor], quant: dict
) -> Callable[[str, torch.Tensor], QuantizedWeight]:
    """`packed(name, w)` for `lowmem.quant_linear.apply_quantize`: the weight `name` (of `w`'s
    shape) as stored, its tensors read by `read(key)`."""

    def packed(name: str, w: torch.Tensor) -> QuantizedWeight:
        shape = tuple(w.shape)
        group = check_format(shape, quant["bits"], quant["group_size"])
        codes, scales = read(name + ".codes"), read(name + ".scales")
        zeros = None if quant["symmetric"] else read(name + ".zeros")
        return QuantizedWeight(codes, scales, zeros, shape, quant["bits"], group)

    return packed
