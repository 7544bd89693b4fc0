"""Peers: the recipes a user would pick instead of lowmem, built so that our meters measure them.

Three rows, all the stock Hugging Face QLoRA recipe, differing only in the loss:

- `hf-qlora`: bitsandbytes NF4 base (`BitsAndBytesConfig`: 4-bit NF4, double quantization, FP32
  compute), `prepare_model_for_kbit_training` (which calls `gradient_checkpointing_enable` with
  use_reentrant=False), peft LoRA r=16 (alpha 32, dropout 0) on q_proj and v_proj, the model's
  own loss with labels -100 on the untrainable positions.
- `hf-qlora-torchtune`: the same decoder, the head on 8 sequence chunks and torchtune's
  `CEWithChunkedOutputLoss` (labels shifted as torchtune's recipes do; logits dropped before
  backward).
- `hf-qlora-cce`: the same decoder, then Cut Cross-Entropy's `linear_cross_entropy(hidden,
  head.weight, labels, shift=True, impl="torch_compile")`, the implementation that runs on CPU.

transformers keeps the tied embedding / LM head and the norms in FP32 and turns every decoder
linear into a `bnb.nn.Linear4bit`: NF4 codes (0.5 B per weight) + a uint8 absmax per 64 weights
+ an FP32 absmax per 256 of those = 0.516 B per weight. Llama-3.2 3B: 2.80e9 decoder weights ->
1.35 GiB, beside the 1.47 GiB FP32 embedding. On real tensors the model is loaded with
`from_pretrained(..., quantization_config=...)`, as a user would. Under `simulated`,
bitsandbytes' `Params4bit` cannot wrap a fake tensor, so `standin_linear4bit` builds the same
`bnb.nn.Linear4bit` around a plain parameter: the same `quantize_4bit` with double quantization
(only its 256-entry code table, computed from data once per process, is an uninitialized one of
the same size), the same forward (`matmul_4bit`), the same peft layer; on the cpu meter its
peak equals real bitsandbytes' (tests/test_peers.py). Under a dispatch mode (our meters)
torch.compile refuses to trace, so CCE's `torch_compile` runs eagerly there; its position filter
(`nonzero`) has no fake shape, so under `simulated` the trainable positions come from the
batch's layout. Each record lists what stood in (`metered`).

Why the peaks are large: no peer offloads the per-layer checkpoints (28 x T x D FP32, 0.66 GiB
at 2048 on Llama) or avoids the FP32 embedding, and only CCE skips the untrainable positions'
logits; the stock loss holds three T x V FP32 tensors at its peak (1.47 GiB at T = 1024 with
Llama's 128256-token vocabulary).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from unittest import mock

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from lowmem.config import StackConfig
from lowmem.memory import meter_context
from lowmem.meter import measure_step
from lowmem.models import base_model, build_model, count_parameters
from lowmem.reference import IGNORE_INDEX
from lowmem.stack import benchmark_batch

PEERS = {
    "hf-qlora": "HF QLoRA (bnb NF4, HF checkpointing, HF loss)",
    "hf-qlora-torchtune": "HF QLoRA + torchtune chunked CE",
    "hf-qlora-cce": "HF QLoRA + Cut Cross-Entropy",
}
PEER_PACKAGES = ("bitsandbytes", "torchtune", "torchao", "cut-cross-entropy", "triton")


@dataclass(frozen=True)
class PeerConfig:
    """One peer cell: the recipe and the benchmark step's inputs (those of `StackConfig`)."""

    peer: str
    seq_len: int = 256
    batch_size: int = 1
    trainable_fraction: float = 0.3  # the last 30% of positions carry labels, as in Table 1
    seed: int = 0
    r: int = 16
    alpha: int = 32
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    chunks: int = 8  # torchtune's default num_output_chunks
    # "cce": CCE's Triton kernel (CUDA only; half precision, so `peer_loss` casts to BF16)
    cce_impl: str = "torch_compile"

    def __post_init__(self) -> None:
        if self.peer not in PEERS:
            raise ValueError(f"unknown peer {self.peer!r}; choose one of {', '.join(PEERS)}")

    def stack_config(self) -> StackConfig:
        """Our `lora` row with the same step inputs: it builds the same benchmark batch."""
        inputs = ("seq_len", "batch_size", "trainable_fraction", "seed")
        return StackConfig(stack="lora", **{k: getattr(self, k) for k in inputs})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def bnb_config() -> BitsAndBytesConfig:
    """The stock QLoRA quantization: NF4, double quantization, FP32 compute."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )


def build_peer(
    model_name: str, cfg: PeerConfig, meter: str, standin: bool | None = None, device="cpu"
) -> torch.nn.Module:
    """The peer's trainable model: random weights seeded by `cfg.seed` (fake when simulated).

    Real bitsandbytes: the FP32 model is written to a temporary directory and loaded back
    through `from_pretrained` with `bnb_config()`. The stand-in (always under `simulated`;
    `standin=True` on real tensors, to compare): `standin_quantize` on the built model."""
    torch.manual_seed(cfg.seed)
    standin = meter == "simulated" if standin is None else standin
    if meter == "simulated" and not standin:
        raise ValueError(
            "bitsandbytes cannot quantize fake tensors: the simulated meter needs the stand-in"
        )
    model = build_model(model_name, "fake" if meter == "simulated" else "random", device)
    if standin:
        standin_quantize(model)
    else:
        model = _load_quantized(model, device)
    model.train()  # from_pretrained returns eval mode; HF checkpointing runs only in training
    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    lora = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=0.0,
        target_modules=list(cfg.targets),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    count_quant_state(model)
    return model


def _load_quantized(fp32: torch.nn.Module, device) -> torch.nn.Module:
    with tempfile.TemporaryDirectory(prefix="lowmem-peer-") as tmp:
        fp32.save_pretrained(tmp)
        del fp32
        return AutoModelForCausalLM.from_pretrained(
            tmp,
            quantization_config=bnb_config(),
            dtype=torch.float32,
            device_map={"": str(device)},
            attn_implementation="sdpa",
        )


def standin_quantize(model: torch.nn.Module) -> None:
    """What `from_pretrained(quantization_config=bnb_config())` does to a model, on fake
    tensors: every decoder linear (not the LM head) becomes a `bnb.nn.Linear4bit`."""
    decoder = base_model(model).model
    for module in list(decoder.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(module, child_name, standin_linear4bit(child))
    model.is_loaded_in_4bit = True  # as transformers' bnb quantizer marks the model
    model.quantization_method = "bitsandbytes"


def standin_linear4bit(linear: torch.nn.Linear):
    """A `bnb.nn.Linear4bit` holding `linear`'s weight quantized as the stock recipe does,
    around a plain uint8 parameter (carrying `Params4bit`'s attributes) instead of a
    `Params4bit`, which cannot wrap a fake tensor."""
    import bitsandbytes as bnb

    with _dynamic_map_for(linear.weight):
        packed, state = bnb.functional.quantize_4bit(
            linear.weight.detach(), blocksize=64, compress_statistics=True, quant_type="nf4"
        )
    layer = bnb.nn.Linear4bit.__new__(bnb.nn.Linear4bit)
    torch.nn.Module.__init__(layer)
    layer.in_features, layer.out_features = linear.in_features, linear.out_features
    weight = torch.nn.Parameter(packed, requires_grad=False)
    weight.__dict__.update(quant_state=state, blocksize=64, compress_statistics=True)
    weight.__dict__.update(quant_type="nf4", quant_storage=torch.uint8, bnb_quantized=True)
    weight.module = layer
    layer.weight = weight
    layer.bias = linear.bias
    layer.compute_dtype, layer.compute_type_is_set = torch.float32, True
    layer.quant_state, layer.quant_storage = state, torch.uint8
    layer.support_avx512bf16_for_cpu = False  # its packed CPU path is for inference only
    return layer


def _dynamic_map_for(weight: torch.Tensor):
    # double quantization reads bitsandbytes' 256-entry "dynamic" code table, computed from
    # data (.tolist()) once per process: a fake tensor cannot; a fake table of the same size can
    from bitsandbytes import functional as F
    from torch._subclasses.fake_tensor import FakeTensor

    if not isinstance(weight, FakeTensor):
        return contextlib.nullcontext()
    return mock.patch.dict(F.name2qmap, {"dynamic": torch.empty(256, dtype=torch.float32)})


def count_quant_state(model: torch.nn.Module) -> None:
    """Make each 4-bit layer's quantization state (absmax, nested absmax, code tables, offset)
    non-persistent buffers, so that a meter, which counts a model's parameters and buffers,
    counts them too; no computation reads them through these names."""
    import bitsandbytes as bnb

    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        state = module.weight.quant_state
        parts = {"absmax": state.absmax, "code": state.code, "offset": state.offset}
        if state.state2 is not None:
            parts.update(nested_absmax=state.state2.absmax, nested_code=state.state2.code)
        for key, tensor in parts.items():
            if isinstance(tensor, torch.Tensor):
                module.register_buffer(f"quant_state_{key}", tensor, persistent=False)


def peer_loss(model: torch.nn.Module, batch: dict, cfg: PeerConfig) -> tuple[torch.Tensor, None]:
    """(loss, None) of one batch the peer's way; what a training loop keeps is only the loss."""
    if cfg.peer == "hf-qlora":
        return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss, None
    base = base_model(model)
    hidden = base.model(input_ids=batch["input_ids"]).last_hidden_state
    head = base.get_output_embeddings()
    labels = batch["labels"]
    if cfg.peer == "hf-qlora-torchtune":
        from torchtune.modules.loss import CEWithChunkedOutputLoss

        ignore = torch.full((labels.shape[0], 1), IGNORE_INDEX, device=labels.device)
        targets = torch.hstack((labels[..., 1:], ignore))  # torchtune's recipes shift this way
        logits = [head(h) for h in hidden.chunk(cfg.chunks, dim=1)]
        loss = CEWithChunkedOutputLoss(cfg.chunks)(logits, targets)
        del logits
        return loss, None
    from cut_cross_entropy import linear_cross_entropy

    classifier = head.weight
    if cfg.cce_impl == "cce":  # the Triton kernel takes half precision only: cast, as users do
        hidden, classifier = hidden.to(torch.bfloat16), classifier.to(torch.bfloat16)
    return linear_cross_entropy(hidden, classifier, labels, shift=True, impl=cfg.cce_impl), None


@contextlib.contextmanager
def metered(cfg: PeerConfig, meter: str) -> Iterator[list[str]]:
    """What a peer needs to run under one of our meters; yields the list of what stood in."""
    notes = []
    with contextlib.ExitStack() as stack:
        if meter == "simulated":
            notes.append(
                "bitsandbytes NF4 stand-in: lowmem.peers.standin_linear4bit (bnb.nn.Linear4bit "
                "around a plain uint8 parameter; real quantize_4bit with double quantization)"
            )
        if cfg.peer == "hf-qlora-cce" and cfg.cce_impl == "torch_compile":
            # under a dispatch mode torch.compile refuses to trace: the function runs eagerly
            stack.enter_context(torch.compiler.set_stance("force_eager"))
            notes.append("cut-cross-entropy torch_compile impl run eagerly (no compilation)")
            if meter == "simulated":
                stack.enter_context(_known_valids(cfg))
                notes.append("cut-cross-entropy valid positions given from the batch layout")
        yield notes


def _known_valids(cfg: PeerConfig):
    # CCE finds trainable positions with nonzero(), whose count a fake tensor cannot know; the
    # benchmark batch's layout (the last ceil(fraction x T) labels kept) gives the same flat
    # indices into the shifted targets that `_build_flat_valids` computes
    def known(targets: torch.Tensor, ignore_index: int, shift: bool) -> torch.Tensor:
        if not shift or targets.shape[0] != 1:
            raise ValueError(
                f"bad CCE call under the meters: batch {targets.shape[0]}, shift={shift}; the "
                "known trainable positions cover the benchmark batch only (batch 1, shift=True)"
            )
        n = targets.shape[1]  # T, before the shift; as stack.benchmark_batch masks them
        first = n - math.ceil(cfg.trainable_fraction * n) - 1
        # int64: the original sums int32 columns, which promotes
        return torch.arange(max(first, 0), n - 1, dtype=torch.int64, device=targets.device)

    return mock.patch("cut_cross_entropy.torch_compile._build_flat_valids", known)


def measure_peer(model_name: str, cfg: PeerConfig, meter: str, standin: bool | None = None):
    """(metrics of one metered step, what stood in): `lowmem.meter.measure_step` on the peer,
    keeping only the loss through backward, as a training loop does."""
    with meter_context(meter) as dev, metered(cfg, meter) as notes:
        model = build_peer(model_name, cfg, meter, standin, dev)
        if standin and meter != "simulated":
            notes.insert(0, "bitsandbytes NF4 stand-in on real tensors (comparison)")
        batch = benchmark_batch(cfg.stack_config(), model.config.vocab_size, dev)
        loss_fn = functools.partial(peer_loss, cfg=cfg)
        metrics = measure_step(model, batch, meter, keep_outputs=False, loss_fn=loss_fn)
        metrics["stored_weight_bytes"] = frozen_bytes(model)
        metrics["trainable_parameters"] = count_parameters(model)[1]
        del model, batch
    return metrics, notes


def frozen_bytes(model: torch.nn.Module) -> int:
    """Bytes of the frozen model as stored (packed codes, quantization state, FP32 embedding)."""
    tensors = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
    return sum(s.nbytes() for s in {t.untyped_storage() for t in tensors})
