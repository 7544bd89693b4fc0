"""The stack's rows and one run's configuration: one dial from full fine-tuning to the last row.

Table 1 of the paper is cumulative: every row adds one technique to the row above it. Here that
is a single dial, `Techniques.stack`, naming a row of `PROFILES` (data: the techniques it
enables and what its `auto` settings resolve to); every paper row is a prefix of `STACK`.
`best` is the beyond-the-paper profile: every exact technique, no approximation of the loss.
`Techniques` holds the row and one settings section per technique (lowmem.settings);
`StackConfig` adds the inputs of a benchmark step (seq_len, batch_size, trainable_fraction,
seed). Both are validated on construction; `parse_spec` / `describe` turn a StackConfig into a
one-line spec of flat settings and back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from lowmem.settings import (
    SECTIONS,
    CheckpointSettings,
    KernelSettings,
    LoraSettings,
    QuantSettings,
    SoftmaxSettings,
    check,
    check_types,
    flat_fields,
    parse_value,
)

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
    mlp_tile_elements: int = 0
    """Elements of one T x F intermediate of an MLP tile: tokens per tile = this // F, the MLP's
    width (0 = no tiling)."""
    prefetch: bool = True
    """Read layer i - 1's input and weights while layer i runs backward."""
    attention_block: Callable[[int], int] = lambda seq_len: 0
    """Tokens per query and key block of the exact block attention, from T (0 = SDPA)."""
    attention_rows: Callable[[int], int] = lambda seq_len: 0
    """Query rows per block of a checkpointed layer's attention half, from T (0 = whole)."""
    rope: str = "stock"
    """How RoPE runs where `KernelSettings.rope` is auto (lowmem.rope.ROPES)."""
    mlp_first: bool = False
    """A checkpointed layer's tiled MLP runs backward first, from its input kept in the store
    (with disk offload; `CheckpointSettings.mlp_first`)."""


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
# layer's weights on the device at a time; each layer's tiled MLP runs backward first, from its
# input kept in the store (mlp_first: with disk offload only, since in memory every layer's
# MLP input would stay resident beside its layer input); RoPE a head at a time (lowmem.rope).
# From 4096 tokens on the attention half of each layer runs in blocks of 512 query rows with K
# and V whole (lowmem.attention_rows): below that the MLP holds the peak and the blocks would
# only cost time. Block attention (lowmem.block_attention, tiles of keys too) stays off: on top
# of the MLP-first backward it gains nothing at 2048 and 1.631 -> 1.508 GiB at 16384
# (results/raw/block_attention/, experiments/LOG.md)
ROWS_BLOCK, ROWS_FROM = 512, 4096
# An MLP tile holds a few tile x F intermediates; it is sized by their bytes, not by tokens: 256
# tokens on Llama-3.2 3B (F = 8192), 190 on Qwen-2.5 3B (11008), 1365 on SmolLM2-135M (1536),
# where 256 tokens would expand each MLP weight four times as often at 1024 tokens for nothing
# (experiments/LOG.md, session 18)
MLP_TILE_ELEMENTS = 256 * 8192
PROFILES["best"] = Profile(
    "lowmem best (exact loss)",
    ("lora", "quantize", "checkpoint", "logits_mask", "fused_loss", "fused_norm"),
    dequant_rows=lambda seq_len: max(1024, seq_len // 8),
    mlp_tile_elements=MLP_TILE_ELEMENTS,
    prefetch=False,
    attention_block=lambda seq_len: 0,
    attention_rows=lambda seq_len: ROWS_BLOCK if seq_len >= ROWS_FROM else 0,
    rope="per_head",
    mlp_first=True,
)
ROWS = tuple(PROFILES)
LABELS = {row: profile.label for row, profile in PROFILES.items()}


@dataclass(frozen=True)
class Techniques:
    """What a model is trained with: a profile (a row of PROFILES) and one settings section per
    technique (lowmem.settings); `lowmem.prepare` takes these. Validated on construction, before
    any work is done, including the combinations no backend can honour."""

    stack: str = "lora"
    """Last technique enabled, one of STACK; every earlier one is enabled too (or best)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    quant: QuantSettings = field(default_factory=QuantSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    softmax: SoftmaxSettings = field(default_factory=SoftmaxSettings)
    kernels: KernelSettings = field(default_factory=KernelSettings)

    def __post_init__(self) -> None:
        check_types(self)
        check(self.stack in ROWS, "stack", self.stack, f"one of {', '.join(ROWS)}")
        for name, section in SECTIONS.items():
            value = getattr(self, name)
            check(isinstance(value, section), name, value, f"a lowmem.{section.__name__}")
        tile = self._mlp_tile()
        policy = self.checkpoint.cache_policy
        blocks = self._attention_block(getattr(self, "seq_len", AUTO_SEQ_LEN))
        check(
            not (self.kernels.gqa == "repeat_kv" and blocks),
            "gqa",
            self.kernels.gqa,
            "auto or native with block attention (it never copies K/V), or attention_block=0",
        )
        check(
            self.checkpoint.mlp_first in ("auto", "off") or (tile and self.enabled("checkpoint")),
            "mlp_first",
            self.checkpoint.mlp_first,
            "auto or off unless the row checkpoints and mlp_tile > 0 (the MLP-first backward is "
            "a checkpointed layer's, with its MLP tiled)",
        )
        rows = self._attention_rows(getattr(self, "seq_len", AUTO_SEQ_LEN), tile)
        check(
            not rows or (self._mlp_first(tile) != "off" and policy == "none" and not blocks),
            "attention_rows",
            self.kernels.attention_rows,
            "0 or auto unless the MLP-first backward is on (a checkpointed row with mlp_tile > 0 "
            "and disk offload, or mlp_first=store/recompute), cache_policy=none and "
            "attention_block=0",
        )
        check(
            not (rows and self.kernels.gqa == "repeat_kv"),
            "gqa",
            self.kernels.gqa,
            "auto or native with attention_rows (it groups the heads in the kernel)",
        )
        check(
            not (tile and policy in ("mlp", "all_linear")),
            "cache_policy",
            policy,
            "none or attention when the MLP is tiled",
        )
        # bitsandbytes layers are neither streamed from the weight store nor cached: refuse the
        # combination rather than run a row that silently keeps them resident / recomputes them
        bnb_kept = self.enabled("checkpoint") and self.quant.backend != "lowmem"
        check(
            not (bnb_kept and (self.checkpoint.stream_weights or policy != "none")),
            "quant_backend",
            self.quant.backend,
            "'lowmem' when checkpointing streams weights or caches linears (bitsandbytes "
            "layers do neither); or pass stream_weights=false and cache_policy=none",
        )

    @classmethod
    def from_flat(cls, stack: str | None = None, /, **values):
        """The configuration of flat settings (`softmax_k=100`, lowmem.settings) and top-level
        fields; a section may also be given whole (`quant=QuantSettings(bits=8)`)."""
        if stack is not None:
            values["stack"] = stack
        fields = flat_fields(cls)
        unknown = sorted(set(values) - set(fields) - set(SECTIONS))
        if unknown:
            raise ValueError(f"bad setting {unknown[0]!r}: must be one of {', '.join(fields)}")
        top = {k: v for k, v in values.items() if k in SECTIONS or fields[k].section is None}
        for name, section in SECTIONS.items():
            mine = [k for k in values if k in fields and fields[k].section == name]
            given = {fields[k].attr: values[k] for k in mine}
            if given:
                base = top.get(name, section())
                check(isinstance(base, section), name, base, f"a lowmem.{section.__name__}")
                top[name] = dataclasses.replace(base, **given)
        return cls(**top)

    def with_settings(self, **values):
        """A copy with flat settings (or top-level fields) changed, validated again."""
        return type(self).from_flat(**{**self.to_dict(), **values})

    def to_dict(self) -> dict:
        """The flat form: {flat name: value} (a record's `config`)."""
        return {
            flat.name: getattr(getattr(self, flat.section) if flat.section else self, flat.attr)
            for flat in flat_fields(type(self)).values()
        }

    def check_model(self, vocab_size: int) -> None:
        """Refuse settings that the model's vocabulary makes impossible (before any work)."""
        check(
            not self.enabled("softmax_approx") or self.softmax.k <= vocab_size,
            "softmax_k",
            self.softmax.k,
            f"at most the model's vocabulary size {vocab_size} (K = V is the exact softmax)",
        )

    @property
    def profile(self) -> Profile:
        return PROFILES[self.stack]

    def _attention_block(self, seq_len: int) -> int:
        block = self.kernels.attention_block
        return block if block >= 0 else self.profile.attention_block(seq_len)

    def _mlp_tile(self, mlp_width: int | None = None) -> int:
        """Explicit, or the profile's for an MLP of `mlp_width` (its intermediate size F); -1
        where the profile tiles and F is not known yet (apply_stack knows it)."""
        if self.kernels.mlp_tile >= 0:
            return self.kernels.mlp_tile
        elements = self.profile.mlp_tile_elements
        if not elements:
            return 0
        return max(1, elements // mlp_width) if mlp_width else -1

    def _mlp_first(self, tile: int) -> str:
        """What checkpoint.mlp_first resolves to, given the resolved MLP tile."""
        first = self.checkpoint.mlp_first
        if first == "auto":
            on = self.profile.mlp_first and tile != 0 and self.checkpoint.offload == "disk"
            first = "store" if on else "off"
        return first

    def _attention_rows(self, seq_len: int, tile: int) -> int:
        """Explicit, or the profile's where the row can run it (auto never refuses)."""
        rows = self.kernels.attention_rows
        if rows >= 0:
            return rows
        fits = self._mlp_first(tile) != "off" and self.checkpoint.cache_policy == "none"
        fits = fits and not self._attention_block(seq_len) and self.kernels.gqa != "repeat_kv"
        return self.profile.attention_rows(seq_len) if fits else 0

    def enabled(self, technique: str) -> bool:
        """Whether `technique` is on in this row (PROFILES)."""
        return technique in self.profile.techniques

    def resolved(self, seq_len: int | None = None, mlp_width: int | None = None):
        """The same configuration with every `auto` setting replaced by what this row runs at
        `seq_len` tokens (best's dequantization chunk and attention block grow with it; the run's
        own seq_len, or AUTO_SEQ_LEN for a configuration without one) on a model whose MLP is
        `mlp_width` wide (best's MLP tile; without it an auto tile stays -1)."""
        seq_len = seq_len or getattr(self, "seq_len", AUTO_SEQ_LEN)
        k, c, profile = self.kernels, self.checkpoint, self.profile
        block = self._attention_block(seq_len)
        tile = self._mlp_tile(mlp_width)
        rows = self._attention_rows(seq_len, tile)
        gqa = "native" if self.enabled("quantize") or block or rows else "repeat_kv"
        kernels = dataclasses.replace(
            k,
            dequant_chunk=k.dequant_chunk
            if k.dequant_chunk >= 0
            else profile.dequant_rows(seq_len),
            mlp_tile=tile,
            gqa=k.gqa if k.gqa != "auto" else gqa,
            attention_block=block,
            attention_rows=rows,
            rope=k.rope if k.rope != "auto" else profile.rope,
        )
        prefetch = c.offload_prefetch if c.offload_prefetch >= 0 else int(profile.prefetch)
        first = self._mlp_first(kernels.mlp_tile)
        checkpoint = dataclasses.replace(c, offload_prefetch=prefetch, mlp_first=first)
        return dataclasses.replace(self, kernels=kernels, checkpoint=checkpoint)


AUTO_SEQ_LEN = 1024  # the context `auto` settings are resolved for when none is given


@dataclass(frozen=True)
class StackConfig(Techniques):
    """One benchmark run: the techniques plus the inputs of its step (`benchmark_batch`)."""

    seq_len: int = 1024
    """Context length T in tokens."""
    batch_size: int = 1
    """Sequences per step (the paper uses 1)."""
    trainable_fraction: float = 0.3
    """Share of positions, at the end of each sequence, whose labels are trainable."""
    seed: int = 0
    """Seed for random weights, adapter init and the benchmark tokens."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("seq_len", "batch_size"):
            value = getattr(self, name)
            check(isinstance(value, int) and value > 0, name, value, "an integer > 0")
        fraction = self.trainable_fraction
        check(0 < fraction <= 1, "trainable_fraction", fraction, "a number in (0, 1]")


# the inputs of a benchmark step, not settings of a technique
BENCHMARK_INPUTS = ("seq_len", "batch_size", "trainable_fraction", "seed")


def parse_spec(spec: str, **defaults) -> StackConfig:
    """ "checkpoint:offload=memory,cache_policy=mlp" -> StackConfig; values typed by setting."""
    if not isinstance(spec, str):
        raise ValueError(f"bad stack spec {spec!r}: must be a string such as 'best:softmax_k=100'")
    stack, _, rest = spec.partition(":")
    fields = flat_fields(StackConfig)
    values = dict(defaults, stack=stack)
    for item in filter(None, rest.split(",")):
        key, sep, raw = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(
                f"bad stack spec {spec!r}: {item!r} is not setting=value with a setting "
                f"of StackConfig ({', '.join(fields)})"
            )
        values[key] = parse_value(StackConfig, key, raw)
    return StackConfig.from_flat(**values)


def describe(cfg: StackConfig) -> str:
    """The inverse of parse_spec: the stack and every setting that is not the default."""
    default = StackConfig(stack=cfg.stack).to_dict()
    extra = [
        f"{k}={'+'.join(v) if isinstance(v, tuple) else v}"
        for k, v in cfg.to_dict().items()
        if k not in ("stack", "seq_len") and v != default[k]
    ]
    return cfg.stack + (":" + ",".join(extra) if extra else "")
