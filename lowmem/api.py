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

The model owns its offload stores (disk files under `offload_dir`): `with lowmem.prepare(...)
as model:` or `model.close()` removes them; so does garbage collection of the model.
"""

from __future__ import annotations

import functools
import os
import warnings
import weakref

import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from lowmem.checkpoint import checkpointing_of
from lowmem.config import BENCHMARK_INPUTS, ROWS, Techniques
from lowmem.loader import load_quantized
from lowmem.loss import check_token_ids, own_head, own_head_loss
from lowmem.models import base_model, load_from_directory
from lowmem.reference import IGNORE_INDEX
from lowmem.settings import SECTIONS, flat_fields
from lowmem.stack import apply_stack

SETTINGS = (*(name for name in flat_fields(Techniques) if name != "stack"), *SECTIONS)


def plan(profile: str = "best", **settings) -> Techniques:
    """The concrete configuration `prepare` applies: the profile with `settings` over its
    defaults, every `auto` (-1) resolved; refused with one line if it cannot be honoured."""
    if profile not in ROWS:
        raise ValueError(f"bad profile={profile!r}: must be one of {', '.join(ROWS)}")
    for name in settings:
        if name not in SETTINGS:
            hint = " (a benchmark input, not a setting)" if name in BENCHMARK_INPUTS else ""
            raise ValueError(
                f"bad setting {name!r}{hint}: lowmem.prepare takes {', '.join(SETTINGS)}"
            )
    return Techniques.from_flat(profile, **settings).resolved()


def prepare(
    model: PreTrainedModel | str | os.PathLike, profile: str = "best", **settings
) -> torch.nn.Module:
    """`model` (a Hugging Face causal LM of a supported family, or its local directory) under
    `profile` (one of lowmem.config.ROWS), ready for a stock training loop.

    `settings` override the profile's technique settings (`lowmem.api.SETTINGS`, e.g.
    lora_r=8, offload="memory", offload_dir="/scratch"). Returns the peft model (the bare
    model for `baseline`), changed in place; its resolved configuration is `.lowmem_config`.
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
    return _take_over(apply_stack(model, cfg, "cuda" if device.type == "cuda" else "cpu"), cfg)


def _take_over(prepared: torch.nn.Module, cfg: Techniques) -> torch.nn.Module:
    """Install the profile's forward and `Prepared`'s methods on a model under `cfg`."""
    hf = base_model(prepared)
    hf.forward = _loss_forward(hf, cfg)
    prepared.__class__ = _prepared_class(type(prepared))
    prepared.lowmem_config = cfg
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


@functools.cache
def _prepared_class(cls: type) -> type:
    return type(f"Lowmem{cls.__name__}", (Prepared, cls), {})


def _loss_forward(hf: PreTrainedModel, cfg: Techniques):
    """The forward `prepare` installs on the Hugging Face model (held weakly: no cycle)."""
    ref = weakref.ref(hf)
    model_forward = type(hf).forward

    def forward(
        input_ids=None, attention_mask=None, position_ids=None, labels=None, **kwargs
    ) -> CausalLMOutputWithPast:
        model = ref()
        if attention_mask is not None and position_ids is None and attention_mask.dim() == 2:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
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
