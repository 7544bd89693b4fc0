"""Where the techniques find things in a decoder: one small table entry per model family.

The techniques rewrite parts of a decoder layer: checkpointing wraps each layer, the tiled MLP
replaces the MLP's forward (and takes the post-attention norm into its tiles), the fused norm
swaps every RMSNorm's backward. Each needs to know where those parts are, and the tiled MLP
also relies on a fact about the layer's wiring: that the MLP output is read by nothing but the
residual add that ends the layer, so a recompute whose output values nobody reads may skip
computing them (`lowmem.tiled_mlp._Tiles.values_unused`). Those facts are stated here, per
Hugging Face `model_type`, instead of being inferred from class names in each technique.

A family enters the table only when its layers are what the techniques assume: a token
embedding used as is (the quantized embedding replaces the module), pre-norm RMSNorm decoder
layers, a gated SiLU MLP of gate/up/down projections, and the residual wiring above. Llama,
Qwen2 and Mistral qualify (Mistral's layer is Llama's line for line; its sliding window
lives in the attention mask, which the techniques pass through untouched). Gemma does not: it
scales the embedding output by sqrt(D) inside the embedding module, which the quantized
embedding would drop (`lowmem.models.check_architecture` refuses it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.mistral.modeling_mistral import MistralRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm


@dataclass(frozen=True)
class Architecture:
    """The parts of one family's decoder that lowmem rewrites, by attribute name."""

    layers: str  # dotted path from the *ForCausalLM model to the ModuleList of decoder layers
    attention: str  # a layer's self-attention module
    mlp: str  # a layer's MLP module
    post_attention_norm: str  # a layer's norm in front of the MLP
    norm_class: type[torch.nn.Module]  # the RMSNorm class (layers' norms and the final norm)
    mlp_feeds_residual_only: bool  # the MLP output is read only by the layer's last residual add

    def decoder_layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        """The decoder layers of a Hugging Face causal LM of this family (not a peft wrapper)."""
        return model.get_submodule(self.layers)


ARCHITECTURES: dict[str, Architecture] = {
    kind: Architecture(
        layers="model.layers",
        attention="self_attn",
        mlp="mlp",
        post_attention_norm="post_attention_layernorm",
        norm_class=norm,
        mlp_feeds_residual_only=True,
    )
    for kind, norm in (
        ("llama", LlamaRMSNorm),
        ("qwen2", Qwen2RMSNorm),
        ("mistral", MistralRMSNorm),
    )
}
