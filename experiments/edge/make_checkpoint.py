"""Write a registered model with random weights as a real sharded BF16 Hugging Face directory.

    python experiments/edge/make_checkpoint.py llama-3.2-3b ~/.cache/lowmem/edge/llama-3.2-3b

config.json (the registered config, torch_dtype bfloat16), model-0000i-of-0000N.safetensors
(at most `--shard-gb` GB each, as `save_pretrained` splits; the tied LM head is not stored),
model.safetensors.index.json and the registered tokenizer's files. Each tensor is generated
and written in row blocks (N(0, initializer_range) for 2-D weights, ones for norms, zeros for
biases), so the process never holds more than one block: the safetensors header is written
first from the shapes, then the data in header order. Llama-3.2 3B: 6.43e9 B in 2 shards.
"""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path

import torch

from lowmem.convert import shard_groups
from lowmem.loader import skeleton
from lowmem.models import get_spec, load_config, load_tokenizer

BLOCK_ELEMENTS = 8 * 2**20  # BF16 values generated at a time (16 MiB)


def write_shard(path: Path, names: list[str], shapes: dict, std: float, seed: int) -> int:
    """One safetensors file written block by block; returns its data bytes."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        size = 2 * torch.Size(shapes[name]).numel()
        span = [offset, offset + size]
        header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": span}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as safetensors writes it
    gen = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name in names:
            shape = shapes[name]
            n = torch.Size(shape).numel()
            for start in range(0, n, BLOCK_ELEMENTS):
                k = min(BLOCK_ELEMENTS, n - start)
                if len(shape) == 1:
                    block = torch.ones(k) if "norm" in name else torch.zeros(k)
                else:
                    block = torch.randn(k, generator=gen) * std
                f.write(block.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    return offset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="registered model, e.g. llama-3.2-3b, qwen-2.5-3b")
    p.add_argument("out_dir", help="folder to create (must not exist)")
    p.add_argument("--shard-gb", type=float, default=5.0, help="most GB per shard")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = Path(args.out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=False)
    config = load_config(args.model)
    shapes = {n: tuple(t.shape) for n, t in skeleton(config).named_parameters()}  # tied once
    sizes = {name: 2 * torch.Size(shape).numel() for name, shape in shapes.items()}  # BF16
    groups = shard_groups(sizes, int(args.shard_gb * 1e9))
    weight_map, total = {}, 0
    for i, names in enumerate(groups, 1):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        total += write_shard(out / file, names, shapes, config.initializer_range, args.seed + i)
        weight_map |= dict.fromkeys(names, file)
        print(f"wrote {file}", flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.dtype = torch.bfloat16
    config.save_pretrained(out)
    if get_spec(args.model).tokenizer or get_spec(args.model).gguf_asset:
        load_tokenizer(args.model).save_pretrained(out)
    print(f"{out}: {len(shapes)} tensors, {total} bytes in {len(groups)} shard(s)")


if __name__ == "__main__":
    main()
