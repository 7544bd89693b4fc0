"""Base + adapter as one plain Hugging Face model directory, written a layer at a time.

`model.save_pretrained(dir)` on a prepared model writes a stock PEFT adapter (a few MiB) that
peft loads onto the FP32 base. `merge` writes the other deployable form: W + scale * B A for
every adapted linear, the rest of the base as it is, in FP32 safetensors that
`AutoModelForCausalLM.from_pretrained` loads with no lowmem and no peft installed.

The base is what the prepared model computes with: a quantized weight is dequantized (its
codes x scales: the merged model's logits equal the prepared model's, not the original FP32
base's), a streamed one is read from the weight store. One shard per decoder layer: only that
layer's FP32 weights exist at a time (Llama-3.2 3B: 0.36 GiB per layer; the 1.47 GiB tied
embedding is its own shard), never the 12 GiB model.

Atomicity: written into a temporary folder beside OUT_DIR and renamed into place
(`lowmem.files.new_folder`); an existing non-empty OUT_DIR is refused.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from lowmem.checkpoint import CachedLinear
from lowmem.files import new_folder
from lowmem.models import base_model
from lowmem.weights import DenseWeight, frozen_weight

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


def merge(model: torch.nn.Module, out_dir: str | Path, tokenizer=None) -> Path:
    """Write `model` (prepared by lowmem.prepare, or any model lowmem's stack changed) with
    its active adapters merged, as an FP32 Hugging Face directory at `out_dir`; return it.
    `tokenizer`, when given, is saved beside the weights."""
    hf = base_model(model)
    config = _plain_config(hf.config)
    with torch.device("meta"):  # the stock parameter names, without any storage
        names = list(AutoModelForCausalLM.from_config(config).state_dict())
    if config.tie_word_embeddings:
        names.remove("lm_head.weight")
    groups: dict[str, list[str]] = {}
    for name in names:
        layer = _LAYER_KEY.match(name)
        groups.setdefault(layer.group(1) if layer else "rest", []).append(name)
    out = Path(out_dir)
    weight_map, total = {}, 0
    with new_folder(out) as tmp:
        for k, (group, keys) in enumerate(tqdm(groups.items(), desc="merge", unit="shard")):
            file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
            with _weights_loaded(hf, group):
                tensors = {key: _merged(hf, key) for key in keys}
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            weight_map.update(dict.fromkeys(keys, file))
            del tensors
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out


def _plain_config(config):
    """The model's config as a stock checkpoint has it: FP32, KV cache on, SDPA."""
    plain = copy.deepcopy(config)
    plain.use_cache = True  # checkpointing turned it off for training
    plain.dtype = torch.float32
    plain._attn_implementation = "sdpa"
    for name in [k for k in vars(plain) if k.startswith("lowmem")]:
        delattr(plain, name)
    if hasattr(plain, "quantization_config"):  # a GGUF-loaded model's; the merge is plain FP32
        del plain.quantization_config
    return plain


class _weights_loaded:
    """A checkpointed layer's streamed weights, read from the store for the block."""

    def __init__(self, hf: torch.nn.Module, group: str) -> None:
        layer = hf.model.layers[int(group)] if group.isdigit() else None
        self.wrapper = getattr(layer, "lowmem_checkpoint", None)

    def __enter__(self):
        if self.wrapper is not None:
            self.wrapper.load_weights()

    def __exit__(self, *exc):
        if self.wrapper is not None:
            self.wrapper.unload_weights()


def _merged(hf: torch.nn.Module, key: str) -> torch.Tensor:
    """The FP32 tensor of the stock parameter `key`: dequantized, adapters added."""
    path, _, leaf = key.rpartition(".")
    module = hf.get_submodule(path)
    base = module.get_base_layer() if isinstance(module, LoraLayer) else module
    base = base.inner if isinstance(base, CachedLinear) else base
    if leaf == "bias":
        return base.bias.detach().float().clone()
    if leaf != "weight":
        return getattr(base, leaf).detach().float().clone()
    weight = dense_weight(base)
    if isinstance(module, LoraLayer):
        for adapter in module.active_adapters:
            if adapter in module.lora_A:
                weight = weight + module.get_delta_weight(adapter).detach().float()
    return weight.contiguous()


def dense_weight(module: torch.nn.Module) -> torch.Tensor:
    """The FP32 weight a frozen (quantized, streamed, bitsandbytes or plain) module computes
    with, as a new tensor."""
    weight = frozen_weight(module)
    rows = weight.rows(0, weight.shape[0]).float()
    return rows.clone() if isinstance(weight, DenseWeight) else rows  # dense rows are views
