"""The stack's rows and one run's configuration: one dial from full fine-tuning to the last row.

Table 1 of the paper is cumulative: every row adds one technique to the row above it. Here that
is a single dial, `StackConfig.stack`, naming a row of `PROFILES` (data: the techniques it
enables and what its `auto` settings resolve to); every paper row is a prefix of `STACK`.
`best` is the beyond-the-paper profile: every exact technique, no approximation of the loss.
`StackConfig` holds every other knob of a run, validated on construction; `parse_spec` /
`describe` turn it into a one-line spec and back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from lowmem.checkpoint import POLICIES
from lowmem.offload import OFFLOADS
from lowmem.quantize import BACKENDS, BITS, GROUP_SIZES
from lowmem.softmax_approx import RULES, VARIANTS

STACK = ("baseline", "lora", "quantize", "checkpoint", "softmax_approx", "logits_mask")


@dataclass(frozen=True)
class Profile:
    """A named row: the techniques it enables and what its `auto` (-1) settings resolve to."""

    label: str
    """The row's name in tables and figures."""
    techniques: tuple[str, ...]
    """Techniques enabled (STACK names, plus the beyond-the-paper fused_loss, fused_norm)."""
    dequant_rows: Callable[[int], int] = lambda seq_len: 0
    """Output rows of a quantized layer dequantized at a time, from T (0 = the whole matrix)."""
    mlp_tile: int = 0
    """Tokens per MLP tile (0 = no tiling)."""
    prefetch: bool = True
    """Read layer i - 1's input and weights while layer i runs backward."""


_PAPER_LABELS = (
    "FP32 Baseline",
    "+ LoRA (r=16)",
    "+ Quantization (INT4)",
    "+ Checkpointing",
    "+ SM Approx. (top-1000)",
    "+ Logits Masking (30% trainable)",
)
# every paper row is a prefix of STACK: each adds one technique to the row above (Table 1)
PROFILES: dict[str, Profile] = {
    row: Profile(label, STACK[: i + 1])
    for i, (row, label) in enumerate(zip(STACK, _PAPER_LABELS, strict=True))
}
# beyond the paper: every exact technique, no approximation of the loss. The FP32 piece of a
# dequantized weight stays small next to the layer's T x D activations, and its count per
# tiled-MLP pass stays constant in T from 8192 on (re-dequantized per tile); prefetch off: one
# layer's weights on the device at a time
PROFILES["best"] = Profile(
    "lowmem best (exact loss)",
    ("lora", "quantize", "checkpoint", "logits_mask", "fused_loss", "fused_norm"),
    dequant_rows=lambda seq_len: max(1024, seq_len // 8),
    mlp_tile=256,
    prefetch=False,
)
ROWS = tuple(PROFILES)
LABELS = {row: profile.label for row, profile in PROFILES.items()}

GQA_MODES = ("auto", "repeat_kv", "native")
LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class StackConfig:
    """One run's configuration; validated on construction, before any work is done."""

    stack: str = "lora"
    """Last technique enabled, one of STACK; every earlier one is enabled too."""
    seq_len: int = 1024
    """Context length T in tokens."""
    batch_size: int = 1
    """Sequences per step (the paper uses 1)."""
    trainable_fraction: float = 0.3
    """Share of positions, at the end of each sequence, whose labels are trainable."""
    lora_r: int = 16
    """LoRA rank r."""
    lora_alpha: int = 32
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input path."""
    lora_targets: tuple[str, ...] = field(default=("q_proj", "v_proj"))
    """Linear layers that get adapters, from LINEAR_TARGETS, or ("all-linear",)."""
    quant_bits: int = 4
    """Bits per quantized base weight: 4 or 8."""
    quant_group_size: int = 32
    """Weights sharing one FP32 scale, along the input dimension: 32, 64, 128, or 0 (per row)."""
    quant_symmetric: bool = True
    """Symmetric (scale only) or asymmetric (scale + FP32 zero point) quantization."""
    quant_backend: str = "lowmem"
    """"lowmem" (the format above) or "bnb-nf4" / "bnb-fp4" (bitsandbytes, decoder linears)."""
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
    softmax_k: int = 1000
    """Candidates per position for the softmax approximation (K; K = V is exact)."""
    softmax_rule: str = "model_topk"
    """How candidates are chosen: model_topk (highest logits) or target_neighbors (embedding
    neighbours of the target)."""
    softmax_variant: str = "paper"
    """paper: full N x V logits/scores, subset gathered; chunked: never a whole N x V matrix."""
    loss_chunk: int = 4096
    """Vocabulary rows per chunk in the fused loss and the chunked softmax approximation."""
    dequant_chunk: int = -1
    """Output rows of a quantized layer dequantized at a time: 0 = the whole matrix, -1 = auto
    (whole in the paper rows, as the paper implies; max(1024, seq_len // 8) rows in best)."""
    mlp_tile: int = -1
    """Tokens per MLP tile (lowmem.tiled_mlp): 0 = off, -1 = auto (off in the paper rows,
    256 in best)."""
    gqa: str = "auto"
    """Grouped-query attention in SDPA: "repeat_kv" copies the K/V heads up to the query heads
    before the kernel; "native" passes enable_gqa=True and copies nothing; "auto" does what
    Table 1's numbers imply for each row: repeat_kv for baseline and lora, native from quantize
    on (experiments/LOG.md)."""
    seed: int = 0
    """Seed for random weights, adapter init and the benchmark tokens."""

    def __post_init__(self) -> None:
        targets = self.lora_targets
        targets = targets.split(",") if isinstance(targets, str) else targets
        if isinstance(targets, list | tuple):  # a YAML list comes in too
            object.__setattr__(self, "lora_targets", tuple(targets))
        check_types(self)
        _check(self.stack in ROWS, "stack", self.stack, f"one of {', '.join(ROWS)}")
        _check(
            self.softmax_rule in RULES,
            "softmax_rule",
            self.softmax_rule,
            f"one of {', '.join(RULES)}",
        )
        _check(
            self.softmax_variant in VARIANTS,
            "softmax_variant",
            self.softmax_variant,
            f"one of {', '.join(VARIANTS)}",
        )
        for name in ("seq_len", "batch_size", "lora_r", "lora_alpha", "softmax_k", "loss_chunk"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value > 0, name, value, "an integer > 0")
        _check(
            0 < self.trainable_fraction <= 1,
            "trainable_fraction",
            self.trainable_fraction,
            "a number in (0, 1]",
        )
        _check(0 <= self.lora_dropout < 1, "lora_dropout", self.lora_dropout, "a number in [0, 1)")
        _check(self.quant_bits in BITS, "quant_bits", self.quant_bits, f"one of {BITS}")
        _check(
            self.quant_group_size in GROUP_SIZES,
            "quant_group_size",
            self.quant_group_size,
            f"one of {GROUP_SIZES} (0 = one group per row)",
        )
        _check(
            self.quant_backend in BACKENDS,
            "quant_backend",
            self.quant_backend,
            f"one of {', '.join(BACKENDS)}",
        )
        _check(self.offload in OFFLOADS, "offload", self.offload, f"one of {', '.join(OFFLOADS)}")
        _check(
            self.cache_policy in POLICIES,
            "cache_policy",
            self.cache_policy,
            f"one of {', '.join(POLICIES)}",
        )
        _check(self.dequant_chunk >= -1, "dequant_chunk", self.dequant_chunk, ">= -1")
        _check(self.mlp_tile >= -1, "mlp_tile", self.mlp_tile, ">= -1")
        _check(
            self.offload_prefetch in (-1, 0, 1),
            "offload_prefetch",
            self.offload_prefetch,
            "-1, 0 or 1",
        )
        _check(
            not (self.resolved_mlp_tile and self.cache_policy in ("mlp", "all_linear")),
            "cache_policy",
            self.cache_policy,
            "none or attention when the MLP is tiled",
        )
        _check(self.gqa in GQA_MODES, "gqa", self.gqa, f"one of {', '.join(GQA_MODES)}")
        # bitsandbytes layers are neither streamed from the weight store nor cached: refuse the
        # combination rather than run a row that silently keeps them resident / recomputes them
        bnb_kept = self.enabled("checkpoint") and self.quant_backend != "lowmem"
        _check(
            not (bnb_kept and (self.stream_weights or self.cache_policy != "none")),
            "quant_backend",
            self.quant_backend,
            "'lowmem' when checkpointing streams weights or caches linears (bitsandbytes "
            "layers do neither); or pass stream_weights=false and cache_policy=none",
        )
        targets = self.lora_targets
        ok = targets == ("all-linear",) or (targets and set(targets) <= set(LINEAR_TARGETS))
        _check(
            bool(ok),
            "lora_targets",
            ",".join(targets),
            f"'all-linear' or a subset of {', '.join(LINEAR_TARGETS)}",
        )

    def check_model(self, vocab_size: int) -> None:
        """Refuse settings that the model's vocabulary makes impossible (before any work)."""
        _check(
            not self.enabled("softmax_approx") or self.softmax_k <= vocab_size,
            "softmax_k",
            self.softmax_k,
            f"at most the model's vocabulary size {vocab_size} (K = V is the exact softmax)",
        )

    def enabled(self, technique: str) -> bool:
        """Whether `technique` is on in this row (PROFILES)."""
        return technique in PROFILES[self.stack].techniques

    @property
    def gqa_mode(self) -> str:
        """The GQA path this row runs: "auto" resolved."""
        if self.gqa != "auto":
            return self.gqa
        return "native" if self.enabled("quantize") else "repeat_kv"

    @property
    def resolved_dequant_chunk(self) -> int:
        if self.dequant_chunk >= 0:
            return self.dequant_chunk
        return PROFILES[self.stack].dequant_rows(self.seq_len)

    @property
    def resolved_mlp_tile(self) -> int:
        return self.mlp_tile if self.mlp_tile >= 0 else PROFILES[self.stack].mlp_tile

    @property
    def resolved_prefetch(self) -> bool:
        if self.offload_prefetch >= 0:
            return bool(self.offload_prefetch)
        return PROFILES[self.stack].prefetch

    def resolved(self) -> StackConfig:
        """The same run with every `auto` (-1) setting replaced by what this row runs."""
        return dataclasses.replace(
            self,
            dequant_chunk=self.resolved_dequant_chunk,
            mlp_tile=self.resolved_mlp_tile,
            offload_prefetch=int(self.resolved_prefetch),
            gqa=self.gqa_mode,
        )

    def to_dict(self) -> dict:
        return asdict(self)


def check_types(obj: object) -> None:
    """Refuse a field value of the wrong type (a quoted "false" for a bool, 1.5 for an int);
    an int for a float field becomes that float. Dataclass fields, annotated by name."""
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
        _check(ok, f.name, value, kind[1])


_KINDS = {  # annotation -> (accepted types, what the message calls it)
    "bool": (bool, "true or false (a boolean, not a string)"),
    "int": (int, "an integer"),
    "float": ((int, float), "a number"),
    "str": (str, "a string"),
    "tuple[str, ...]": (tuple, "a list of strings"),
}
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def parse_value(cls: type, key: str, raw: str) -> object:
    """A `--set key=raw` / spec string typed by the field `key` of the dataclass `cls`."""
    kind = {f.name: f.type for f in dataclasses.fields(cls)}[key]
    try:
        if kind == "bool":
            return _BOOLS[raw.lower()]
        if kind in ("int", "float"):
            return int(raw) if kind == "int" else float(raw)
    except (KeyError, ValueError):
        raise ValueError(f"bad {key}={raw!r}: must be {_KINDS[kind][1]}") from None
    return tuple(raw.split("+")) if kind.startswith("tuple") else raw


def parse_spec(spec: str, **defaults) -> StackConfig:
    """ "checkpoint:offload=memory,cache_policy=mlp" -> StackConfig; values typed by field."""
    if not isinstance(spec, str):
        raise ValueError(f"bad stack spec {spec!r}: must be a string such as 'best:softmax_k=100'")
    stack, _, rest = spec.partition(":")
    fields = {f.name: f for f in dataclasses.fields(StackConfig)}
    values = dict(defaults, stack=stack)
    for item in filter(None, rest.split(",")):
        key, sep, raw = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(
                f"bad stack spec {spec!r}: {item!r} is not field=value with a field "
                f"of StackConfig ({', '.join(fields)})"
            )
        values[key] = parse_value(StackConfig, key, raw)
    return StackConfig(**values)


def describe(cfg: StackConfig) -> str:
    """The inverse of parse_spec: the stack and every field that is not the default."""
    default = StackConfig(stack=cfg.stack).to_dict()
    extra = [
        f"{k}={'+'.join(v) if isinstance(v, tuple) else v}"
        for k, v in cfg.to_dict().items()
        if k not in ("stack", "seq_len") and v != default[k]
    ]
    return cfg.stack + (":" + ",".join(extra) if extra else "")


def _check(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"bad {name}={value!r}: must be {allowed}")
