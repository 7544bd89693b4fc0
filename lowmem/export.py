"""The FP32 base model as a plain Hugging Face directory, for stock tools to load an adapter onto.

An adapter trained under any stack row is deployed on the unquantized FP32 base (quantization,
checkpointing and the loss rows replace the frozen base layers only). Stock tools find that base
through the adapter's `adapter_config.json` (`base_model_name_or_path`), and
`peft.AutoPeftModelForCausalLM.from_pretrained(adapter_dir)` loads it with
`AutoModelForCausalLM.from_pretrained`. For `smollm2-135m` the only weights on disk are a GGUF
file (`make assets`), which that call cannot load without being told the file name, and
transformers refuses to `save_pretrained` a model it loaded from GGUF. `export_base` writes the
same FP32 weights `build_model(model, "pretrained")` computes with (the GGUF's Q4_1 blocks
dequantized) as a plain directory: config.json, model.safetensors, and the tokenizer files
where the model has a tokenizer. `cached_base` does it once per model into the lowmem cache.

Size: SmolLM2-135M, 134.5e6 parameters x 4 B (FP32, tied embedding stored once) = 513 MiB.

Atomicity (`lowmem.files.new_folder`): the directory is written into a temporary folder
beside OUT_DIR, then renamed into place; a failure removes it (and the parent folders this call
created), so nothing half-written is ever found under OUT_DIR. An existing non-empty OUT_DIR
is refused. Modes: those the user's umask gives (`lowmem.files`).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from lowmem import assets
from lowmem.files import check_out_dir, new_folder
from lowmem.models import REGISTRY, ModelError, base_model, build_model, get_spec, load_tokenizer

EXPORT_FORMAT = "fp32"  # part of the cache folder's name: a new format never reads an old one


def export_base(model: str, out_dir: str | Path, model_path: str | Path | None = None) -> Path:
    """Write the FP32 base of a registered model (or of `model_path`) to `out_dir`; return it.

    `out_dir` must not exist or be an empty folder; missing parent folders are created."""
    out = Path(out_dir)
    check_out_dir(out)
    path = None if model_path is None else str(model_path)
    hf = build_model(model, "pretrained", model_path=path)
    try:
        tokenizer = load_tokenizer(model, path)
    except ModelError:  # a model without a tokenizer (the tiny test models): weights only
        tokenizer = None
    with new_folder(out) as tmp:
        plain_copy(hf).save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out


def plain_copy(hf: PreTrainedModel) -> PreTrainedModel:
    """The same weights in a model transformers will save: a GGUF-loaded model carries a
    `quantization_config` (gguf) that makes `save_pretrained` refuse; the copy has none."""
    config = copy.deepcopy(hf.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = ""
    with torch.device("meta"):  # no second allocation: the tensors are assigned below
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(hf.state_dict(), assign=True)
    plain.tie_weights()
    return plain


def cached_base(model: str) -> Path:
    """The exported FP32 base of a registered model with bundled (GGUF) weights, written once
    into `$LOWMEM_CACHE/bases/` (`make assets` must have run). Two processes may export at the
    same time: one rename wins and the other process uses its folder."""
    spec = get_spec(model)
    if spec.gguf_asset is None:
        raise ModelError(f"model {model!r} has no bundled weights to export")
    asset = assets.ASSETS[spec.gguf_asset]
    out = assets.cache_dir() / "bases" / f"{model}-{asset.version}-{EXPORT_FORMAT}"
    if not _complete(out):
        try:
            export_base(model, out)
        except (ValueError, OSError):
            if not _complete(out):  # not the race above: a real problem
                raise
    return out


def _complete(out: Path) -> bool:
    return (out / "config.json").is_file() and any(out.glob("*.safetensors"))


def loadable_base(model: torch.nn.Module) -> str | None:
    """What an adapter of `model` (a peft model built by lowmem) should name as its base so
    that stock tools load it: the absolute path of the user's directory when the weights came
    from `model_path=`; the exported FP32 base (`cached_base`) when they came from a registered
    model's GGUF asset; None for random weights, which exist nowhere on disk."""
    name = getattr(base_model(model).config, "_name_or_path", None)
    if not name:
        return None
    path = Path(name)
    if (path / "config.json").is_file():
        return str(path.resolve())
    for spec in REGISTRY.values():
        if spec.gguf_asset and path.resolve() == assets.asset_dir(spec.gguf_asset).resolve():
            try:
                return str(cached_base(spec.name))
            except OSError as err:  # a full or read-only cache: the adapter itself is fine
                warnings.warn(
                    f"could not export the base of {spec.name!r} for the adapter config "
                    f"({err}); load the adapter with PeftModel.from_pretrained onto "
                    f"lowmem.models.build_model({spec.name!r}, 'pretrained')",
                    stacklevel=2,
                )
                return None
    return None
