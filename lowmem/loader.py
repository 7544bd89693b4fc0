"""Load a local Hugging Face directory straight into a quantizing profile, one tensor at a time.

`lowmem.models.load_from_directory` + `lowmem.stack.apply_stack` first builds the whole model in
FP32 and only then quantizes it, so the peak of loading is the FP32 model: Llama-3.2 3B,
3.213e9 x 4 B = 11.97 GiB, for a model that trains with 1.87 GiB of INT4 weights. `load_quantized`
gives the same model without that copy:

1. the skeleton is built on the meta device from config.json (no data); each of its parameters
   becomes a CPU placeholder of the right shape that owns 4 bytes (a zero expanded to the
   shape), so peft's LoRA wrapper creates its adapters on the CPU, drawing the same random
   numbers in the same order as on a loaded model (same torch seed, same LoRA init);
2. norms and biases (the 1-D parameters) are loaded as they are (FP32);
3. `apply_quantize` swaps in the quantized layers as in `apply_stack`, each weight read from its
   safetensors shard (BF16 / FP16 / FP32 on disk, converted to FP32) and quantized at once,
   `block_bytes` of FP32 rows at a time: quantization works per row (groups run along D_in),
   so the codes and scales of row blocks are those of the whole matrix, bit for bit. The
   128256 x 3072 embedding of Llama is 1.47 GiB in FP32; in 16 MiB blocks its transient is
   16 MiB of FP32 plus the quantize temporaries (a few times that); a tied LM head shares the
   embedding's quantized weight. The rest of the row follows as `apply_stack` applies it
   (`lowmem.stack.apply_after_quantize`).

Peak, Llama-3.2 3B: the quantized model (1.87 GiB) + the LoRA adapters (17.5 MiB) + one block's
transients (~4 x 16 MiB), instead of 11.97 GiB; safetensors also maps the whole tensor being
read from its file (page cache, not allocated memory; `LiveStorageTracker` counts it anyway).
SmolLM2-135M (FP32 on disk, 513 MiB): tracked peak 227 MiB, of which 80 MiB quantized model
and 108 MiB the mapped FP32 embedding. Every shard is checked against the skeleton
(present, readable, every tensor's shape and dtype) before any weight is read; a bad one is
refused with one error naming the file.

A converted directory (`lowmem.convert`, recognised by its manifest, `lowmem.converted`) gives
the same model from its packed tensors, read as they are: step 3 reads codes and scales instead
of quantizing. `loads_by_tensor` says when a run loads through here rather than whole.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForCausalLM, PretrainedConfig

from lowmem.attention import set_gqa
from lowmem.config import Techniques
from lowmem.converted import INDEX, MANIFEST, check_loadable, expected_tensors, unpacker
from lowmem.models import ModelError, base_model, check_model_dir, mlp_width, read_config
from lowmem.quant_linear import apply_quantize
from lowmem.quantize import QuantizedWeight, quantize
from lowmem.stack import apply_after_quantize, apply_lora
from lowmem.tensor_files import DTYPES, pread_into

DISK_DTYPES = ("BF16", "F16", "F32")  # as safetensors names them
BLOCK_BYTES = 16 * 2**20  # FP32 rows quantized at a time


def loads_by_tensor(cfg: Techniques, model_path: str | Path | None) -> bool:
    """Whether a run of `cfg` on `model_path` loads through `load_quantized`: a directory under
    a row that quantizes with the lowmem backend, whose FP32 model is never needed."""
    return model_path is not None and cfg.enabled("quantize") and cfg.quant.backend == "lowmem"


def load_quantized(
    model_dir: str | Path,
    cfg: Techniques,
    meter: str = "cpu",
    block_bytes: int = BLOCK_BYTES,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """The model in `model_dir` (a Hugging Face or a converted directory) under the row `cfg`
    (one that quantizes with the lowmem backend), as `apply_stack(load_from_directory(model_dir),
    cfg, meter)` gives it, without ever holding the FP32 model; built on the CPU, moved to
    `device` once quantized, before the techniques that follow quantization."""
    if not loads_by_tensor(cfg, model_dir):
        raise ValueError(
            f"load_quantized builds rows that quantize with the lowmem backend; got stack="
            f"{cfg.stack!r}, quant_backend={cfg.quant.backend!r} (load the others whole)"
        )
    if block_bytes <= 0:
        raise ValueError(f"bad block_bytes={block_bytes}: must be > 0")
    if not cfg.quant.plain:  # lowmem.quantize options the loader and converted format lack
        raise ValueError(
            "load_quantized reads the round-to-nearest INT format with FP32 scales only; "
            "quant_codebook, quant_method, quant_scale_search, quant_loftq_iters, "
            "quant_vocab_bits and quant_scale_dtype need the FP32 model: build it "
            "(lowmem.models.load_from_directory) and apply_stack it"
        )
    path = check_model_dir(model_dir)
    manifest = check_loadable(path, cfg)
    config = read_config(path)
    cfg.check_model(config.vocab_size)
    cfg = cfg.resolved(mlp_width=mlp_width(config))
    model = skeleton(config)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    with contextlib.ExitStack() as files:
        if manifest is None:
            shards = open_shards(path, {k: (s, DISK_DTYPES) for k, s in shapes.items()}, files)

            def packed(key: str, w: torch.Tensor) -> QuantizedWeight:
                return read_quantized(shards, key, tuple(w.shape), cfg, block_bytes)

        else:
            expected = expected_tensors(shapes, manifest["quantization"])
            shards = open_shards(
                path, expected, files, INDEX, None, f"the config.json and {MANIFEST}"
            )
            packed = unpacker(shards.view, manifest["quantization"])
            model.config._name_or_path = manifest["source"]["path"]  # the FP32 base of adapters
        placeholders = _placeholders(model)
        set_gqa(model, cfg.kernels.gqa, cfg.kernels.attention_block)
        model = apply_lora(model, cfg)
        _materialize(base_model(model), shards.rows, packed, placeholders, cfg)
    return apply_after_quantize(model.to(device), cfg, meter)


def skeleton(config: PretrainedConfig) -> torch.nn.Module:
    """The model of `config` (FP32, SDPA, train mode) on the meta device: no weight exists;
    only the computed buffers (rotary frequencies) are real, on the CPU."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, attn_implementation="sdpa"
        )
    model.train()
    _rebuild_buffers(model, config)
    return model


def read_quantized(
    shards: Shards, key: str, shape: tuple[int, int], cfg: Techniques, block_bytes: int
) -> QuantizedWeight:
    """The weight `key` read from its shard and quantized under `cfg`, `block_bytes` of FP32
    rows at a time."""
    return quantize_by_rows(
        lambda a, b: shards.rows(key, a, b),
        shape,
        cfg.quant.bits,
        cfg.quant.group_size,
        cfg.quant.symmetric,
        max(1, block_bytes // (4 * shape[1])),
    )


class Shards:
    """The open safetensors files and which holds each tensor; reads rows of one.

    Rows are copied out of the file with pread into a new tensor, not viewed through
    safetensors' memory map: a page read through a map stays in the process's resident memory
    (RssFile) until the map goes, which is when the last tensor viewing it dies. Converting
    Llama-3.2 3B through the map peaked at 6.8 GiB RSS, 6.1 GiB of it the BF16 source mapped
    (experiments/edge); a copy lives as long as its tensor, and the file's pages stay in the
    page cache, not in the process."""

    def __init__(self, where: dict[str, Path], handles: dict[Path, object]) -> None:
        self.where, self.handles = where, handles
        self._fds: dict[Path, int] = {}
        self._spans: dict[Path, dict] = {}

    def read(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """The tensor `key` (rows start:stop of it) in its dtype on disk."""
        file = self.where[key]
        try:
            dtype, shape, begin, end = self._span(file, key)
            rows = shape[0] if shape else 1
            row = (end - begin) // max(rows, 1)
            a = 0 if start is None else min(max(start, 0), rows)
            b = rows if stop is None else min(max(stop, a), rows)
            out = torch.empty(row * (b - a), dtype=torch.uint8)
            pread_into(self._fds[file], out, begin + a * row)
        except (SafetensorError, OSError, RuntimeError, ValueError, KeyError) as err:
            raise ModelError(f"cannot read tensor {key!r} from {str(file)!r}: {err}") from err
        shape = (b - a, *shape[1:]) if shape and start is not None else tuple(shape)
        return out.view(DTYPES[dtype]).reshape(shape)

    def view(self, key: str) -> torch.Tensor:
        """The tensor `key` viewed through safetensors' memory map: no copy; its pages become
        resident as they are read and leave when the map goes (the file closed and every
        tensor viewing it dead). A converted directory's packed weights are read this way:
        streamed to the offload store one layer after another, only the shards still in use
        stay mapped, instead of the whole packed model held at once."""
        file = self.where[key]
        try:
            return self.handles[file].get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as err:
            raise ModelError(f"cannot read tensor {key!r} from {str(file)!r}: {err}") from err

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _span(self, file: Path, key: str) -> tuple[str, list[int], int, int]:
        """(dtype, shape, first byte, end byte) of `key` in `file`, from its header."""
        if file not in self._spans:
            fd = os.open(file, os.O_RDONLY)
            self._fds[file] = fd
            n = int.from_bytes(os.pread(fd, 8, 0), "little")
            header = json.loads(os.pread(fd, n, 8))
            self._spans[file] = {k: (v, 8 + n) for k, v in header.items() if k != "__metadata__"}
        info, data = self._spans[file][key]
        first, end = info["data_offsets"]
        return info["dtype"], info["shape"], data + first, data + end

    def rows(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """`read`, in FP32."""
        return self.read(key, start, stop).to(torch.float32)


def open_shards(
    path: Path,
    expected: dict[str, tuple[tuple, tuple[str, ...]]],
    files: contextlib.ExitStack,
    index_name: str = "model.safetensors.index.json",
    single_name: str | None = "model.safetensors",
    rule: str = "the config.json",
) -> Shards:
    """Open a model's shard(s) (one `single_name` file, or those `index_name` maps); check that
    every expected tensor ({key: (shape, allowed dtypes)}, what `rule` of the directory
    requires) is present with its shape and dtype. Files stay open until `files` closes."""
    index = path / index_name
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ModelError(f"bad safetensors index {str(index)!r}: {err!r}") from err
        where = {key: path / weight_map[key] for key in expected if key in weight_map}
        missing, source = [k for k in expected if k not in weight_map], index
    elif single_name is not None and (path / single_name).is_file():
        single = path / single_name
        where, missing, source = dict.fromkeys(expected, single), [], single
    else:
        wanted = f"neither {single_name} nor {index_name}" if single_name else f"no {index_name}"
        raise ModelError(f"model_path {str(path)!r} has {wanted}")
    handles = {}
    for file in sorted(set(where.values())):
        if not file.is_file():
            raise ModelError(f"shard {str(file)!r} named by {str(index)!r} does not exist")
        try:
            handles[file] = files.enter_context(safe_open(str(file), framework="pt"))
        except (SafetensorError, OSError) as err:
            raise ModelError(f"cannot open shard {str(file)!r}: {err}") from err
        missing += [k for k, f in where.items() if f == file and k not in handles[file].keys()]
    if missing:
        raise ModelError(f"{str(source)!r} lacks the tensors {', '.join(sorted(missing))}")
    for key, file in where.items():
        piece = handles[file].get_slice(key)
        shape, dtype = tuple(piece.get_shape()), piece.get_dtype()
        need, dtypes = expected[key]
        if shape != need or dtype not in dtypes:
            raise ModelError(
                f"tensor {key!r} in {str(file)!r} is {dtype} {shape}; {rule} of "
                f"{str(path)!r} needs shape {need} in {' or '.join(dtypes)}"
            )
    shards = Shards(where, handles)
    files.callback(shards.close)
    return shards


def _rebuild_buffers(model: torch.nn.Module, config) -> None:
    """The rotary embedding's inverse frequencies (computed, not stored) on the CPU."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            if "RotaryEmbedding" not in type(module).__name__:
                raise ModelError(f"cannot build the buffers of {name} ({type(module).__name__})")
            with torch.device("cpu"):
                rebuilt = type(module)(config=config)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, rebuilt)


def _placeholders(model: torch.nn.Module) -> set[int]:
    """Swap each meta parameter for a 4-byte CPU stand-in of its shape (tied ones stay tied)."""
    made: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                if id(p) not in made:
                    stand_in = torch.zeros((), dtype=p.dtype).expand(p.shape)
                    made[id(p)] = torch.nn.Parameter(stand_in, requires_grad=p.requires_grad)
                module._parameters[name] = made[id(p)]
    return {id(p) for p in made.values()}


def _materialize(base, rows, packed, placeholders: set[int], cfg: Techniques) -> None:
    """Replace every placeholder: norms and biases first (`rows(name)`, FP32, frozen, as loaded
    whole), then `apply_quantize` takes the linears, embedding and head from `packed`."""
    for name, p in list(base.named_parameters()):
        if id(p) in placeholders and p.dim() == 1:
            loaded = rows(name.replace(".base_layer", ""))
            parent, _, child = name.rpartition(".")
            module = base.get_submodule(parent)
            module._parameters[child] = torch.nn.Parameter(loaded, requires_grad=p.requires_grad)
    apply_quantize(
        base,
        cfg.quant.bits,
        cfg.quant.group_size,
        cfg.quant.symmetric,
        chunk=cfg.kernels.dequant_chunk,
        packed=packed,
    )
    left = [n for n, p in base.named_parameters() if id(p) in placeholders]
    if left:  # a family with 2-D parameters apply_quantize does not take (none supported now)
        raise ModelError(f"the loader does not know how to load {', '.join(left)}")


def quantize_by_rows(
    read: Callable[[int, int], torch.Tensor],
    shape: tuple[int, int],
    bits: int,
    group_size: int,
    symmetric: bool,
    block_rows: int,
) -> QuantizedWeight:
    """`quantize` of a D_out x D_in weight read `block_rows` FP rows at a time by `read(a, b)`;
    bit-identical to quantizing it whole (each row's groups are quantized on their own)."""
    d_out = shape[0]
    out = None
    for start in range(0, d_out, block_rows):
        stop = min(start + block_rows, d_out)
        q = quantize(read(start, stop), bits, group_size, symmetric)
        if out is None:  # the packed tensors filled in place: no second copy to concatenate

            def full(t):
                return None if t is None else t.new_empty((d_out, *t.shape[1:]))

            out = QuantizedWeight(
                full(q.codes), full(q.scales), full(q.zeros), tuple(shape), bits, q.group_size
            )
        for whole, part in ((out.codes, q.codes), (out.scales, q.scales), (out.zeros, q.zeros)):
            if whole is not None:
                whole[start:stop] = part
    return out
