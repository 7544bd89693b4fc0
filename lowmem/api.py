"""lowmem as a library: one call turns a Hugging Face causal LM into one that any loop trains.

    model = lowmem.prepare(AutoModelForCausalLM.from_pretrained(path), "best")
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()                      # the profile's loss; no B x T x V logits exist

`prepare` applies a profile (a row of Table 1 or `best`, `lowmem.config.ROWS`) with
`apply_stack` and takes over the model's forward: with labels, the rows that compute the head
and loss themselves (softmax_approx, logits_mask, best) run the decoder to the final hidden
states and return `out.loss` from lowmem's loss (`lowmem.loss.own_head_loss`) and
`out.logits = None`; the earlier rows keep the Hugging Face head and loss. Without labels every
row returns the full logits, as the model did (generation, evaluation by logits).

Padding: with an `attention_mask` and no `position_ids`, positions count the real tokens only
(cumsum of the mask - 1), so a left-padded sequence gets the positions it has unpadded (stock
training code gives it positions shifted by its padding). Pad positions must carry label -100.

Under `transformers.Trainer`: the forward takes `num_items_in_batch` (the Trainer passes the
token count of the whole accumulated step), and the loss is then the sum over this batch's
tokens divided by it, as the Hugging Face loss does, so gradient accumulation weighs tokens,
not micro-batches; a micro-batch with no trainable token then adds 0 (not the NaN of a mean
over nothing).

Under TRL (tested: trl 1.16): every SFTTrainer patches the Hugging Face model with TRL's own
chunked LM head (`trl.trainer.utils.add_fused_lm_head`) and calls it with `fused_lm_head=True`
for per-token log-probabilities, entropies and top-1 hits; that head reads `lm_head.weight`
(absent from a quantized or streamed head) and is not the profile's loss. A prepared peft model
answers the call itself (`FusedHead`): the profile's forward gives the loss and its gradients,
one more walk over the vocabulary C rows at a time gives the token values (`token_stats`),
never B x T x V. TRL sums the log-probabilities: its loss equals lowmem's in `best` (FP32
rounding) and is the exact one in `softmax_approx`; a loss that weighs tokens unequally
(`loss_type="dft"`, preference trainers) is refused in backward, not given wrong gradients.

Mixed precision: lowmem's layers, checkpointing and losses are FP32 only, so in the rows from
`quantize` on the forward switches autocast off inside (with a warning) under `bf16=True` /
`fp16=True` (TRL's default); the earlier rows keep it.

The model owns its offload stores (disk files under `offload_dir`): `with lowmem.prepare(...)
as model:` or `model.close()` removes them; so does garbage collection of the model.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
import weakref

import torch
from peft import PeftModel
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from lowmem.checkpoint import checkpointing_of
from lowmem.config import BENCHMARK_INPUTS, ROWS, Techniques
from lowmem.fused_loss import token_stats
from lowmem.loader import load_quantized
from lowmem.loss import check_token_ids, own_head, own_head_loss
from lowmem.models import base_model, load_from_directory, mlp_width
from lowmem.reference import IGNORE_INDEX
from lowmem.settings import SECTIONS, flat_fields
from lowmem.stack import apply_stack

SETTINGS = (*(name for name in flat_fields(Techniques) if name != "stack"), *SECTIONS)


def plan(profile: str = "best", **settings) -> Techniques:
    """The concrete configuration `prepare` applies: the profile (a row of ROWS, or a profile
    file written by the budget planner, `lowmem.planner`) with `settings` over its defaults,
    every `auto` (-1) resolved but the MLP tile of a profile that sizes it by the model's MLP
    width (`prepare` resolves it); refused with one line if it cannot be honoured."""
    if profile not in ROWS and str(profile).endswith(".json") and os.path.isfile(profile):
        from lowmem.profile_file import read_profile

        settings = {**read_profile(profile)["settings"], **settings}
        profile = settings.pop("stack")
    if profile not in ROWS:
        raise ValueError(
            f"bad profile={profile!r}: must be one of {', '.join(ROWS)}, or a planner profile "
            "file (.json)"
        )
    for name in settings:
        if name not in SETTINGS:
            hint = " (a benchmark input, not a setting)" if name in BENCHMARK_INPUTS else ""
            raise ValueError(
                f"bad setting {name!r}{hint}: lowmem.prepare takes {', '.join(SETTINGS)}"
            )
    return Techniques.from_flat(profile, **settings).resolved()


def prepare(
    model: PreTrainedModel | str | os.PathLike,
    profile: str = "best",
    calibration: torch.Tensor | None = None,
    **settings,
) -> torch.nn.Module:
    """`model` (a Hugging Face causal LM of a supported family, or its local directory) under
    `profile` (one of lowmem.config.ROWS), ready for a stock training loop.

    `settings` override the profile's technique settings (`lowmem.api.SETTINGS`, e.g.
    lora_r=8, offload="memory", offload_dir="/scratch"). Returns the peft model (the bare
    model for `baseline`), changed in place; its resolved configuration is `.lowmem_config`.
    `calibration`: B x T token ids of training text, which `quant_method="gptq"` needs
    (`lowmem.gptq.calibration_ids(train_dataset, n_tokens)` takes them from a dataset).
    A directory under a profile that quantizes with the lowmem backend is loaded a tensor at a
    time, never whole in FP32 (`lowmem.loader`).
    """
    cfg = plan(profile, **settings)
    if isinstance(model, str | os.PathLike):
        if cfg.enabled("quantize") and cfg.quant.backend == "lowmem":  # never FP32 whole
            return _take_over(load_quantized(model, cfg), cfg)
        model = load_from_directory(model)
    if isinstance(model, Prepared):
        raise ValueError("this model is already prepared by lowmem.prepare; prepare a fresh one")
    if not isinstance(model, PreTrainedModel):
        raise ValueError(
            f"bad model of type {type(model).__name__}: lowmem.prepare takes a Hugging Face "
            "causal LM (a PreTrainedModel, not yet wrapped by peft) or its local directory"
        )
    device = next(model.parameters()).device
    meter = "cuda" if device.type == "cuda" else "cpu"
    return _take_over(apply_stack(model, cfg, meter, calibration), cfg)


def _take_over(prepared: torch.nn.Module, cfg: Techniques) -> torch.nn.Module:
    """Install the profile's forward and `Prepared`'s methods on a model under `cfg`."""
    hf = base_model(prepared)
    hf.forward = _loss_forward(hf, cfg)
    prepared.__class__ = _prepared_class(type(prepared))
    prepared.lowmem_config = cfg.resolved(mlp_width=mlp_width(hf.config))
    return prepared


class Prepared:
    """What `prepare` adds to the model's class: closing its offload stores."""

    def close(self) -> None:
        """Remove the model's offload files; it cannot train afterwards."""
        state = checkpointing_of(self)
        if state is not None:
            state.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def activation_checkpointing_enable(self, *args, **kwargs) -> None:
        """What `Trainer(activation_checkpointing=True)` (or gradient_checkpointing) calls: left
        to transformers in the rows without lowmem's checkpointing; a no-op with a warning in
        the rows with it, which already checkpoint every layer (and offload what they keep)."""
        if self.lowmem_config.enabled("checkpoint"):
            warnings.warn(
                f"the {self.lowmem_config.stack!r} profile already checkpoints every decoder "
                "layer (lowmem.checkpoint); transformers' activation checkpointing is left off",
                stacklevel=2,
            )
            return
        base_model(self).activation_checkpointing_enable(*args, **kwargs)

    gradient_checkpointing_enable = activation_checkpointing_enable  # the name before v5

    def merge_and_unload(self, *args, **kwargs):
        raise NotImplementedError(
            "a lowmem model's base is quantized / streamed: write base + adapter with "
            "lowmem.merge(model, out_dir), then load that folder with from_pretrained"
        )


class FusedHead:
    """What `prepare` adds to a peft model's class: TRL's `fused_lm_head=True` call answered
    by lowmem (see the module docstring); every other call is the model's own."""

    def forward(self, *args, fused_lm_head: bool = False, **kwargs):
        if not fused_lm_head:
            return super().forward(*args, **kwargs)
        from trl.trainer.utils import FusedCausalLMOutput  # only TRL makes this call

        labels, ids = kwargs.get("labels"), kwargs.get("input_ids")
        if labels is None or ids is None or args or "shift_labels" in kwargs:
            raise ValueError(
                "a fused_lm_head=True call needs input_ids= and labels= as keywords (no "
                "positional inputs, no pre-shifted shift_labels)"
            )
        cfg, hf = self.lowmem_config, base_model(self)
        mask = labels[:, 1:] != IGNORE_INDEX
        n, hidden = int(mask.sum()), []
        hook = hf.model.register_forward_hook(lambda m, a, out: hidden.append(out[0].detach()))
        with _fp32(cfg), hook:
            if torch.is_grad_enabled():  # the profile's loss, over this batch's n tokens
                loss = super().forward(**kwargs, num_items_in_batch=max(n, 1)).loss
            else:  # evaluation: the decoder alone, the loss from the log-probabilities
                inputs = {k: v for k, v in kwargs.items() if k != "labels"}
                inputs["position_ids"] = _positions(
                    kwargs.get("attention_mask"), kwargs.get("position_ids")
                )
                hf.model(**inputs)
            if hidden:
                rows, targets = hidden[-1][:, :-1][mask], labels[:, 1:][mask]
                values = token_stats(
                    rows, targets, hf.get_output_embeddings(), cfg.kernels.loss_chunk
                )
            else:  # no trainable token: the profile gave its zero without running the decoder
                values = (mask.new_zeros(0, dtype=torch.float32),) * 2 + (mask.new_zeros(0),)
        log_probs, entropy, is_top1 = (
            v.new_zeros(mask.shape).masked_scatter(mask, v) for v in values
        )
        if torch.is_grad_enabled():
            log_probs = _SummedLogProbs.apply(loss, log_probs, mask)
        else:
            loss = -log_probs.sum() / max(n, 1)
        return FusedCausalLMOutput(
            loss=loss, log_probs=log_probs, entropy=entropy, is_top1=is_top1, label_mask=mask
        )


class _SummedLogProbs(torch.autograd.Function):
    """Per-token log-probabilities (values) whose gradient is the profile loss's: exact for a
    loss that sums them with one weight (TRL's NLL); any other weighting is refused."""

    @staticmethod
    def forward(ctx, loss, log_probs, mask):
        ctx.save_for_backward(mask)
        return log_probs.clone()

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        g = grad[mask]
        if g.numel() and not torch.equal(g, g[:1].expand_as(g)):
            raise ValueError(
                "a loss that weighs the token log-probabilities unequally (TRL's loss_type='dft', "
                "a preference or RL trainer) cannot train a lowmem model: its gradient is the "
                "profile's loss, i.e. their plain sum; use loss_type='nll'"
            )
        # loss is the mean of -log p over the n masked tokens: d sum(log p) = -n d loss
        return -g[:1].sum() * g.numel(), None, None


def _fp32(cfg: Techniques) -> contextlib.AbstractContextManager:
    """Autocast off inside the model in the rows that use lowmem's FP32-only layers and losses."""
    devices = [d for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
    stack = contextlib.ExitStack()
    if devices and cfg.enabled("quantize"):
        warnings.warn(
            f"the {cfg.stack!r} profile computes in FP32 only (lowmem's quantized layers, "
            "checkpointing and losses): autocast (bf16 / fp16 mixed precision) is off inside "
            "the model; pass bf16=False to say so",
            stacklevel=3,
        )
        for d in devices:
            stack.enter_context(torch.autocast(d, enabled=False))
    return stack


def _positions(attention_mask, position_ids):
    """Positions that count the real tokens only, when a 2-D mask is given and none are."""
    if attention_mask is not None and position_ids is None and attention_mask.dim() == 2:
        return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
    return position_ids


@functools.cache
def _prepared_class(cls: type) -> type:
    bases = (Prepared, FusedHead, cls) if issubclass(cls, PeftModel) else (Prepared, cls)
    return type(f"Lowmem{cls.__name__}", bases, {})


def _loss_forward(hf: PreTrainedModel, cfg: Techniques):
    """The forward `prepare` installs on the Hugging Face model (held weakly: no cycle)."""
    ref = weakref.ref(hf)
    model_forward = type(hf).forward

    def forward(
        input_ids=None, attention_mask=None, position_ids=None, labels=None, **kwargs
    ) -> CausalLMOutputWithPast:
        model = ref()
        position_ids = _positions(attention_mask, position_ids)
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        with _fp32(cfg):
            return _labelled(model, inputs, labels, kwargs)

    def _labelled(model, inputs, labels, kwargs) -> CausalLMOutputWithPast:
        input_ids = inputs["input_ids"]
        if labels is None or not own_head(cfg):
            return model_forward(model, **inputs, labels=labels, **kwargs)
        if input_ids is None:
            raise ValueError("lowmem's loss needs input_ids (inputs_embeds are not supported)")
        check_token_ids(input_ids, labels, model.config.vocab_size)
        n_items = kwargs.pop("num_items_in_batch", None)
        for name in ("return_dict", "logits_to_keep", "output_attentions", "output_hidden_states"):
            kwargs.pop(name, None)
        n = (labels[:, 1:] != IGNORE_INDEX).sum()
        if n_items is not None and not n:  # this micro-batch's share of the step's sum: none
            zero = input_ids.new_zeros((), dtype=torch.float32).requires_grad_()
            return CausalLMOutputWithPast(loss=zero)  # a loop may call backward on it
        loss = own_head_loss(model, {**inputs, **kwargs, "labels": labels}, cfg)
        if n_items is not None:  # the Trainer's token count of the whole accumulated step
            loss = loss * (n / n_items)
        return CausalLMOutputWithPast(loss=loss)

    return forward
