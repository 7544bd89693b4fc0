"""One-time conversion: a Hugging Face directory quantized once into a converted directory.

    lowmem.convert("Llama-3.2-3B", "llama-int4", "best")
    python -m lowmem convert Llama-3.2-3B llama-int4 --profile best

A small device then needs only the converted directory (`lowmem.converted`: packed codes and
scales of every 2-D weight, FP32 norms and biases, config.json, tokenizer files, a manifest):
Llama-3.2 3B in 2.01e9 B instead of 6.43e9 B of BF16, loaded with nothing to quantize.

The conversion reads as `lowmem.loader` does, with its shard checks (every shard present and
readable, every tensor's shape and dtype as config.json says) before any weight is read, and
its `quantize_by_rows`, so the codes are bit for bit those the loader computes. Each output
shard is filled in the skeleton's parameter order and written when the next parameter would
overflow it; shards hold at most `shard_bytes` (default: the largest packed parameter, so
never more than a few tensors). Tracked peak: the source tensor being read (safetensors maps it
whole: page cache, counted anyway) + one output shard + one FP32 row block and its quantize
temporaries (~3 x `block_bytes`). Llama-3.2 3B in BF16: 0.73 GiB (its 128256 x 3072 embedding
mapped) + 235 MiB (that embedding packed) + 48 MiB, instead of the 11.97 GiB FP32 model.
Measured on SmolLM2-135M, FP32 on disk (experiments/convert_check): 0.6259 B per parameter
(0.6528 with config, tokenizer and headers), tracked peak 159.9 MiB = the 108 MiB FP32
embedding mapped + 17 MiB packed + the block temporaries, against 513 MiB of FP32 weights.

Atomic (`lowmem.files.new_folder`): written into a temporary folder beside OUT_DIR and renamed
into place at the end, so a failure leaves neither OUT_DIR nor the temporary folder. An existing
non-empty OUT_DIR is refused; `force` replaces an earlier conversion only (a folder with
lowmem.json: lowmem never deletes another folder), once the new one is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from lowmem import __version__
from lowmem.api import plan
from lowmem.converted import (
    FORMAT,
    INDEX,
    MANIFEST,
    VERSION,
    packed_bytes,
    quant_settings,
    read_manifest,
)
from lowmem.files import new_folder, temp_folder
from lowmem.loader import (
    BLOCK_BYTES,
    DISK_DTYPES,
    Shards,
    loads_by_tensor,
    open_shards,
    read_quantized,
    skeleton,
)
from lowmem.models import ModelError, check_model_dir, read_config, weights_identity
from lowmem.results import environment

# besides config.json: what a tokenizer and generation need, copied as they are where present
COPIED = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def convert(
    model_dir: str | Path,
    out_dir: str | Path,
    profile: str = "best",
    force: bool = False,
    shard_bytes: int = 0,
    block_bytes: int = BLOCK_BYTES,
    **settings,
) -> Path:
    """Write the weights of the Hugging Face directory `model_dir` as `profile` (a row that
    quantizes with the lowmem backend, `settings` over its defaults as in `lowmem.prepare`)
    stores them, into the new folder `out_dir`; return it. `shard_bytes`: most bytes per
    output shard (0 = the largest packed parameter's); `block_bytes`: FP32 rows quantized at
    a time. `force`: replace an earlier conversion in `out_dir`."""
    cfg = plan(profile, **settings)
    if not loads_by_tensor(cfg, model_dir):
        raise ValueError(
            f"bad profile={profile!r} with quant_backend={cfg.quant.backend!r}: convert needs "
            "a profile that quantizes with the lowmem backend (quantize, checkpoint, "
            "softmax_approx, logits_mask, best)"
        )
    if shard_bytes < 0:
        raise ValueError(f"bad shard_bytes={shard_bytes}: must be >= 0 (0 = the largest packed)")
    if block_bytes <= 0:
        raise ValueError(f"bad block_bytes={block_bytes}: must be > 0")
    src, out = check_model_dir(model_dir), Path(out_dir)
    if read_manifest(src) is not None:
        raise ModelError(
            f"model_dir {str(src)!r} is already converted ({MANIFEST}); convert the original "
            "Hugging Face directory"
        )
    _check_target(out, force)
    config = read_config(src)
    cfg.check_model(config.vocab_size)
    shapes = {name: tuple(p.shape) for name, p in skeleton(config).named_parameters()}
    quant = quant_settings(cfg)
    sizes = {name: packed_bytes(shape, quant) for name, shape in shapes.items()}
    groups = shard_groups(sizes, shard_bytes or max(sizes.values()))
    with contextlib.ExitStack() as files:
        shards = open_shards(src, {k: (s, DISK_DTYPES) for k, s in shapes.items()}, files)
        with _target(out, force) as tmp:
            weight_map = _write_shards(tmp, groups, shards, shapes, cfg, block_bytes)
            index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
            for name in ("config.json", *COPIED):
                if (src / name).is_file():
                    shutil.copyfile(src / name, tmp / name)
            manifest = _manifest(cfg, src, shapes, sizes)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def _check_target(out: Path, force: bool) -> None:
    """Refuse an OUT_DIR that is a file, or a non-empty folder that `force` may not replace."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not out.is_dir():
        raise ValueError(f"bad out_dir={str(out)!r}: it is a file; must be a new or empty folder")
    if not force:
        raise ValueError(
            f"bad out_dir={str(out)!r}: it exists and is not empty; must be a new or empty "
            "folder (or, with force / --force, an earlier conversion to replace)"
        )
    if read_manifest(out) is None:
        raise ValueError(
            f"bad out_dir={str(out)!r}: force replaces only an earlier conversion (a folder "
            f"with {MANIFEST}); this one is not, and lowmem never deletes another folder"
        )


@contextlib.contextmanager
def _target(out: Path, force: bool) -> Iterator[Path]:
    """A temporary folder that becomes `out` when the block ends, whole or not at all; with
    `force`, an earlier conversion in `out` is moved aside only then, and removed."""
    if not (force and out.is_dir() and any(out.iterdir())):
        with new_folder(out) as tmp:
            yield tmp
        return
    aside = temp_folder(out)  # .<name>.<random>.tmp beside out: holds the new, then the old
    try:
        with new_folder(aside / "new") as tmp:
            yield tmp
        os.replace(out, aside / "old")
        os.replace(aside / "new", out)
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def shard_groups(sizes: dict[str, int], budget: int) -> list[list[str]]:
    """Parameters in order, cut into shards of at most `budget` bytes (a larger parameter
    alone in its shard)."""
    groups, total = [[]], 0
    for name, size in sizes.items():
        if groups[-1] and total + size > budget:
            groups.append([])
            total = 0
        groups[-1].append(name)
        total += size
    return groups


def _write_shards(tmp: Path, groups, shards: Shards, shapes, cfg, block_bytes) -> dict[str, str]:
    """Quantize and write each shard's parameters; the weight map {tensor key: file}."""
    weight_map = {}
    for i, names in enumerate(groups, 1):
        file = f"lowmem-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            tensors |= _converted(name, shapes[name], shards, cfg, block_bytes)
        save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, file)
    return weight_map


def _converted(name: str, shape: tuple, shards: Shards, cfg, block_bytes) -> dict:
    """The tensors a parameter is stored as: a 1-D one in FP32, a 2-D one packed."""
    if len(shape) == 1:
        return {name: shards.rows(name)}
    q = read_quantized(shards, name, shape, cfg, block_bytes)
    parts = {"codes": q.codes, "scales": q.scales, "zeros": q.zeros}
    return {f"{name}.{part}": t for part, t in parts.items() if t is not None}


def _manifest(cfg, src: Path, shapes: dict[str, tuple], sizes: dict[str, int]) -> dict:
    n = sum(torch.Size(s).numel() for s in shapes.values())
    quantized = sum(torch.Size(s).numel() for s in shapes.values() if len(s) == 2)
    return {
        "format": FORMAT,
        "format_version": VERSION,
        "quantization": quant_settings(cfg),
        "config": cfg.to_dict(),
        "source": weights_identity(src),
        "parameters": n,
        "quantized_parameters": quantized,
        "tensor_bytes": sum(sizes.values()),
        "bytes_per_parameter": sum(sizes.values()) / n,
        "environment": {"lowmem": __version__, **environment()},
    }
