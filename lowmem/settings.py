"""Technique settings, one frozen dataclass per technique (PEFT-style), and their flat names.

Each section validates its own values on construction. A setting also has a flat name, the
section's prefix + the field's name (`SoftmaxSettings.k` is `softmax_k`): the name of its
command-line flag, its papermill parameter, its key in a record's `config`, and the keyword
`lowmem.prepare` takes. `flat_fields` lists them with their types, defaults and docstrings, so
none of those places keeps a copy of the configuration.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

from lowmem.checkpoint import MLP_FIRST, POLICIES
from lowmem.offload import OFFLOADS
from lowmem.quantize import BACKENDS, BITS, CODEBOOKS, GROUP_SIZES, SCALE_DTYPES
from lowmem.rope import ROPES
from lowmem.softmax_approx import RULES, VARIANTS

GQA_MODES = ("auto", "repeat_kv", "native")
QUANT_METHODS = ("rtn", "gptq")
LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSettings:
    """The adapters (peft LoRA)."""

    prefix: ClassVar[str] = "lora_"
    r: int = 16
    """LoRA rank r."""
    alpha: int = 32
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA input path."""
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    """Linear layers that get adapters, from LINEAR_TARGETS, or ("all-linear",)."""

    def __post_init__(self) -> None:
        targets = self.targets
        targets = targets.split(",") if isinstance(targets, str) else targets
        if isinstance(targets, list | tuple):  # a YAML list comes in too
            object.__setattr__(self, "targets", tuple(targets))
        check_types(self)
        _positive(self, "r", "alpha")
        check(0 <= self.dropout < 1, "lora_dropout", self.dropout, "a number in [0, 1)")
        targets = self.targets
        ok = targets == ("all-linear",) or (targets and set(targets) <= set(LINEAR_TARGETS))
        allowed = f"'all-linear' or a subset of {', '.join(LINEAR_TARGETS)}"
        check(bool(ok), "lora_targets", ",".join(targets), allowed)


@dataclass(frozen=True)
class QuantSettings:
    """Base-weight quantization (technique 1), dequantized on the fly."""

    prefix: ClassVar[str] = "quant_"
    bits: int = 4
    """Bits per quantized base weight: 4 or 8."""
    group_size: int = 32
    """Weights sharing one scale, along the input dimension: 16, 32, 64, 128, or 0 (per row)."""
    scale_dtype: str = "fp32"
    """How group scales (and zero points) are stored: "fp32", or "fp16" (half the bytes: groups
    of 16 then cost 0.625 B per weight as FP32 groups of 32 do; codes chosen with FP32 scales,
    then rounded). Expanded in FP32 either way (lowmem.quantize.with_scale_dtype)."""
    symmetric: bool = True
    """Symmetric (scale only) or asymmetric (scale + FP32 zero point) quantization."""
    backend: str = "lowmem"
    """"lowmem" (the format above) or "bnb-nf4" / "bnb-fp4" (bitsandbytes, decoder linears)."""
    codebook: str = "int"
    """What a 4-bit code stands for: "int" (evenly spaced levels, the paper) or "nf4" (QLoRA's
    16 normal-float values x the group's absmax; same bytes, the table is 16 FP32 constants)."""
    method: str = "rtn"
    """How the decoder linears' codes are chosen: "rtn" (round to nearest) or "gptq"
    (error-compensating, from calibration activations; lowmem.gptq). Same format either way."""
    calib_tokens: int = 512
    """Calibration tokens of the training text for method gptq (lowmem.gptq.calibration_ids).
    Use 8192 with gptq_sequential: on SmolLM2-135M, GPTQ from 512 tokens FP32-fed (these
    defaults) was worse than round to nearest on held-out text, from 8192 sequential better
    (experiments/LOG.md, session 17; quality rows gptq_v1 and gptq). The defaults stay because
    records and resumed runs compare every field, so new ones would redefine every row."""
    gptq_sequential: bool = False
    """Method gptq: each decoder layer calibrated on the outputs of the layers before it with
    their weights quantized (True), or on the FP32 model's activations (False). Same format."""
    gptq_act_order: bool = False
    """Method gptq: quantize columns in descending diag(X^T X) order, group scales fixed from the
    FP32 weight beforehand (static groups). Same format."""
    scale_search: bool = False
    """Each group's scale the one among its absmax scale x 1, 0.995, ..., 0.75 with the least
    round-trip error, not the absmax (lowmem.quantize.searched_scales; symmetric formats, RTN
    and GPTQ alike). Same format. Skipped under the simulated meter (values are never read)."""
    gptq_weighted_search: bool = False
    """Method gptq with scale_search: each candidate scale's squared round-trip error weighted,
    column by column, by diag(X^T X) of the calibration inputs, so the search minimises an
    estimate of the layer's output error instead of its weight error. Same format."""
    loftq_iters: int = 0
    """LoftQ-style adapter init (lowmem.loftq): 0 = off (peft's init, B = 0), n = alternating
    quantize / SVD steps that make base + adapter approximate the FP32 weight."""
    loftq_keep_codes: bool = False
    """LoftQ with loftq_iters=1: keep the codes quant_method chose (GPTQ's) for the adapted
    layers and fit the adapters to their residual, instead of re-rounding those layers to
    nearest first (lowmem.loftq). Same format."""
    vocab_bits: int = 0
    """Bits of the embedding / LM head table (INT, groups of group_size): 0 = bits, or 4 / 8."""

    def __post_init__(self) -> None:
        check_types(self)
        check(self.bits in BITS, "quant_bits", self.bits, f"one of {BITS}")
        allowed = f"one of {GROUP_SIZES} (0 = one group per row)"
        check(self.group_size in GROUP_SIZES, "quant_group_size", self.group_size, allowed)
        _one_of(self, "backend", BACKENDS)
        _one_of(self, "codebook", CODEBOOKS)
        _one_of(self, "scale_dtype", tuple(SCALE_DTYPES))
        _one_of(self, "method", QUANT_METHODS)
        _positive(self, "calib_tokens")
        for name in ("gptq_sequential", "gptq_act_order"):
            value = getattr(self, name)
            check(
                not value or self.method == "gptq",
                f"quant_{name}",
                value,
                f"false unless quant_method=gptq (quant_method={self.method!r})",
            )
        check(
            not self.gptq_weighted_search or (self.method == "gptq" and self.scale_search),
            "quant_gptq_weighted_search",
            self.gptq_weighted_search,
            f"false unless quant_method=gptq and quant_scale_search=true (quant_method="
            f"{self.method!r}, quant_scale_search={str(self.scale_search).lower()})",
        )
        check(self.loftq_iters >= 0, "quant_loftq_iters", self.loftq_iters, ">= 0 (0 = off)")
        check(
            not self.loftq_keep_codes or self.loftq_iters == 1,
            "quant_loftq_keep_codes",
            self.loftq_keep_codes,
            f"false unless quant_loftq_iters=1 (quant_loftq_iters={self.loftq_iters})",
        )
        check(self.vocab_bits in (0, *BITS), "quant_vocab_bits", self.vocab_bits, "0, 4 or 8")
        nf4_ok = self.codebook == "int" or (self.bits == 4 and self.symmetric)
        check(nf4_ok, "quant_codebook", self.codebook, "int unless bits=4 and symmetric")
        plain_rtn = self.method == "rtn" and not self.loftq_iters and not self.scale_search
        sym_only = self.symmetric or plain_rtn
        check(sym_only, "quant_symmetric", self.symmetric, "true with gptq, loftq or scale_search")
        lowmem_only = (
            "lowmem with codebook, method, scale_search, loftq_iters, vocab_bits or scale_dtype set"
        )
        check(self.plain or self.backend == "lowmem", "quant_backend", self.backend, lowmem_only)

    @property
    def plain(self) -> bool:
        """Whether this is the paper's round-to-nearest INT format throughout."""
        chosen = (
            self.codebook,
            self.method,
            self.scale_search,
            self.loftq_iters,
            self.vocab_bits,
            self.scale_dtype,
        )
        return chosen == ("int", "rtn", False, 0, 0, "fp32")

    @property
    def table_bits(self) -> int:
        """Bits of the embedding / LM head table."""
        return self.vocab_bits or self.bits


@dataclass(frozen=True)
class CheckpointSettings:
    """Checkpointing (technique 2): where activations and streamed weights wait, what is cached."""

    prefix: ClassVar[str] = ""
    offload: str = "disk"
    """Where checkpoints, cached activations and streamed weights wait: "disk" or "memory"."""
    offload_dir: str = ""
    """Root folder for disk offload ("" = the system temp folder); each run gets its own."""
    offload_async: bool = True
    """Write offloaded tensors on a background thread (False: put() waits for the file)."""
    stream_weights: bool = True
    """Keep each layer's quantized weights in the store, loaded only while the layer runs (in
    best also the embedding / LM head, in chunks of loss_chunk rows: lowmem.vocab_stream)."""
    offload_prefetch: int = -1
    """Read layer i - 1's input and weights while layer i runs backward: 1 = on, 0 = off (one
    layer's weights on the device at a time), -1 = auto (on in the paper rows, off in best)."""
    cache_policy: str = "none"
    """Frozen linears whose outputs are cached instead of recomputed: none, attention, mlp,
    all_linear (lowmem.checkpoint.POLICIES)."""
    mlp_first: str = "auto"
    """Run a layer's tiled MLP backward before its attention is recomputed with grad, so that
    the two never hold their tensors at once (lowmem.checkpoint): "store" keeps the MLP input
    in the store from forward (one more T x D written and read per layer), "recompute"
    recomputes it (one more attention forward per layer), "off"; "auto" = store in best with
    disk offload, else off. Needs mlp_tile > 0."""

    def __post_init__(self) -> None:
        check_types(self)
        _one_of(self, "offload", OFFLOADS)
        _one_of(self, "cache_policy", POLICIES)
        check(
            self.offload_prefetch in (-1, 0, 1),
            "offload_prefetch",
            self.offload_prefetch,
            "-1, 0 or 1",
        )
        _one_of(self, "mlp_first", ("auto", *MLP_FIRST))


@dataclass(frozen=True)
class SoftmaxSettings:
    """The softmax approximation over a subset of the vocabulary (technique 3)."""

    prefix: ClassVar[str] = "softmax_"
    k: int = 1000
    """Candidates per position for the softmax approximation (K; K equal to the vocabulary size
    V is exact)."""
    rule: str = "model_topk"
    """How candidates are chosen: model_topk (highest logits) or target_neighbors (embedding
    neighbours of the target)."""
    variant: str = "paper"
    """paper: full N x V logits/scores, subset gathered; chunked: never a whole N x V matrix."""

    def __post_init__(self) -> None:
        check_types(self)
        _positive(self, "k")
        _one_of(self, "rule", RULES)
        _one_of(self, "variant", VARIANTS)


@dataclass(frozen=True)
class KernelSettings:
    """How the beyond-the-paper kernels cut their work: dequantization, MLP, loss, attention."""

    prefix: ClassVar[str] = ""
    loss_chunk: int = 4096
    """Vocabulary rows per chunk in the fused loss and the chunked softmax approximation."""
    dequant_chunk: int = -1
    """Output rows of a quantized layer dequantized at a time: 0 = the whole matrix, -1 = auto
    (whole in the paper rows, as the paper implies; max(1024, seq_len // 8) rows in best)."""
    mlp_tile: int = -1
    """Tokens per MLP tile (lowmem.tiled_mlp): 0 = off, -1 = auto (off in the paper rows; in
    best as many tokens as keep one tile x F intermediate at 8 MiB: 256 on Llama-3.2 3B, 1365
    on SmolLM2-135M; resolved when the model is known)."""
    gqa: str = "auto"
    """Grouped-query attention in SDPA: "repeat_kv" copies the K/V heads up to the query heads
    before the kernel; "native" passes enable_gqa=True and copies nothing; "auto" does what
    Table 1's numbers imply for each row: repeat_kv for baseline and lora, native from quantize
    on (experiments/LOG.md); native whenever attention_block is on."""
    attention_block: int = -1
    """Tokens per query (and key) block of the exact block attention (lowmem.block_attention):
    0 = SDPA, -1 = auto (SDPA in every row for now; experiments/LOG.md)."""
    attention_rows: int = -1
    """Query rows per block of a checkpointed layer's attention half, forward and backward
    (lowmem.attention_rows: K and V whole, everything else a block at a time): 0 = off, -1 =
    auto (best from 4096 tokens on; off in the paper rows). Needs the MLP-first backward."""
    rope: str = "auto"
    """Rotary position embedding: "stock" (transformers' whole-tensor ops), "per_head" (a head
    at a time, same values; lowmem.rope), "auto" (per_head in best, stock in the paper rows)."""

    def __post_init__(self) -> None:
        check_types(self)
        check(self.dequant_chunk >= -1, "dequant_chunk", self.dequant_chunk, ">= -1")
        check(self.mlp_tile >= -1, "mlp_tile", self.mlp_tile, ">= -1")
        check(self.attention_block >= -1, "attention_block", self.attention_block, ">= -1")
        check(self.attention_rows >= -1, "attention_rows", self.attention_rows, ">= -1")
        _positive(self, "loss_chunk")
        _one_of(self, "gqa", GQA_MODES)
        _one_of(self, "rope", ("auto", *ROPES))


SECTIONS = {
    "lora": LoraSettings,
    "quant": QuantSettings,
    "checkpoint": CheckpointSettings,
    "softmax": SoftmaxSettings,
    "kernels": KernelSettings,
}


class FlatField(NamedTuple):
    """One setting under its flat name; `section` is None for a top-level field."""

    name: str
    section: str | None
    attr: str
    type: str
    default: object
    doc: str


@functools.cache
def flat_fields(cls: type) -> dict[str, FlatField]:
    """{flat name: FlatField} of a dataclass, its sections (SECTIONS) flattened in place."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in SECTIONS and f.type == SECTIONS[f.name].__name__:
            section = SECTIONS[f.name]
            for g in dataclasses.fields(section):
                flat = section.prefix + g.name
                doc = field_docs(section).get(g.name, "")
                out[flat] = FlatField(flat, f.name, g.name, g.type, _default(g), doc)
        else:
            owner = next(c for c in cls.__mro__ if f.name in getattr(c, "__annotations__", {}))
            doc = field_docs(owner).get(f.name, "")
            out[f.name] = FlatField(f.name, None, f.name, f.type, _default(f), doc)
    return out


def _default(f: dataclasses.Field) -> object:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field: the docstring written under it in the class body} (attribute docstrings)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for stmt, after in zip(body, body[1:], strict=False):
        doc = getattr(after, "value", None)
        if isinstance(stmt, ast.AnnAssign) and isinstance(doc, ast.Constant):
            if isinstance(doc.value, str):
                docs[stmt.target.id] = " ".join(doc.value.split())
    return docs


def check_types(obj: object) -> None:
    """Refuse a field value of the wrong type (a quoted "false" for a bool, 1.5 for an int);
    an int for a float field becomes that float. Dataclass fields, annotated by name."""
    prefix = getattr(obj, "prefix", "")
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        kind = _KINDS.get(f.type)
        if kind is None:
            continue
        ok = isinstance(value, kind[0]) and not (kind[0] is not bool and isinstance(value, bool))
        if kind[0] is tuple:
            ok = ok and all(isinstance(v, str) for v in value)
        if f.type == "float" and ok:
            object.__setattr__(obj, f.name, float(value))
        check(ok, prefix + f.name, value, kind[1])


_KINDS = {  # annotation -> (accepted types, what the message calls it)
    "bool": (bool, "true or false (a boolean, not a string)"),
    "int": (int, "an integer"),
    "float": ((int, float), "a number"),
    "str": (str, "a string"),
    "tuple[str, ...]": (tuple, "a list of strings"),
}
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def parse_value(cls: type, key: str, raw: str) -> object:
    """A `--set key=raw` / spec string typed by the setting `key` (a flat name) of `cls`."""
    kind = flat_fields(cls)[key].type
    try:
        if kind == "bool":
            return _BOOLS[raw.lower()]
        if kind in ("int", "float"):
            return int(raw) if kind == "int" else float(raw)
    except (KeyError, ValueError):
        raise ValueError(f"bad {key}={raw!r}: must be {_KINDS[kind][1]}") from None
    return tuple(raw.split("+")) if kind.startswith("tuple") else raw


def check(ok: bool, name: str, value: object, allowed: str) -> None:
    """One line naming the bad value and what is allowed."""
    if not ok:
        raise ValueError(f"bad {name}={value!r}: must be {allowed}")


def _positive(section: object, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        check(isinstance(value, int) and value > 0, section.prefix + name, value, "an integer > 0")


def _one_of(section: object, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(section, name)
    check(value in allowed, section.prefix + name, value, f"one of {', '.join(allowed)}")
