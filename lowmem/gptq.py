"""Quantization option: error-compensating codes per layer from calibration activations (GPTQ).

Round-to-nearest (`lowmem.quantize`) picks each code on its own, minimising ||W - Q|| weight by
weight. What training sees is the layer's output, so GPTQ (Frantar, Ashkboos, Hoefler,
Alistarh 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", arXiv 2210.17323) minimises the output error on calibration inputs X (N x D_in)
instead:

    min_Q ||X W^T - X Q^T||^2 = sum over rows w of W: (w - q) H (w - q)^T,  H = X^T X.

It quantizes the columns of W left to right; after column i is rounded, the rounding error is
spread over the columns not yet quantized, in the direction that cancels it best on X (the
optimal-brain-surgeon update): err = (w_i - q_i) / U_ii, W[:, j] -= err U_ij for j > i, where
U is the upper Cholesky factor of H^-1 (H^-1 = U^T U). A group's FP32 scale is fixed when the
walk reaches the group's first column, from the weights as updated so far. Columns go in
blocks of 128 with the update to later blocks applied once per block (the paper's "lazy batch"
trick; the same arithmetic as column by column, `lowmem.reference.gptq_quantize`). H is damped
by 1% of its mean diagonal so that it is invertible. The result is the same packed format
(codes + one FP32 scale per group, INT or NF4): GPTQ changes which codes are stored, not how
many bytes, so the training step's memory is RTN's, tensor for tensor.

Calibration (`calibrate`): `calib_tokens` tokens of the training text (`calibration_ids`: the
first blocks of the train split) go through the FP32 model once, as one batch, before it is
quantized. A forward pre-hook on every decoder linear adds x^T x of its input to H (linears fed
the same tensor, q/k/v and gate/up, share one H); when a decoder layer's forward returns, its
H are complete, so its linears are quantized there and their H freed: at most one layer's H
are alive (Llama-3.2 3B: 3 x 3072^2 + 8192^2 FP32 = 0.36 GiB; SmolLM2-135M: 13 MiB). The
forward stops before the LM head (no B x T x V logits), so the calibration set is bounded by
activations only (SmolLM2-135M at 32768 tokens: ~0.2 GiB for the MLP's widest tensor). By
default every layer sees the FP32 model's activations. `sequential` (the GPTQ paper's own
order, section 4, "Step 3"): when a decoder layer's H are complete and its linears quantized,
the layer runs again on the same input with its weights replaced by the dequantized codes, and
that output goes on to the next layer; so each layer is calibrated on what the quantized model
feeds it and compensates the error of the layers before it (one more layer forward each; the
FP32 weights are restored, LoftQ and round-to-nearest still read them). The embedding / LM head
stay round-to-nearest (the tied table is also a lookup).

`act_order` (GPTQ's "act-order" / desc_act, with AutoGPTQ's "static groups"): the columns are
walked in descending diag(H) order, so the inputs with the most energy are quantized while the
most columns remain to absorb their error. Every group's scale is fixed beforehand from the
FP32 weight (absmax of its own 32 columns), so a group's codes still share one scale and the
stored format, and its dequantization, are unchanged (no permutation index is stored: codes
are written back in the original column order).

`weighted_search` (with `quant_scale_search`): the search over shrunk group scales
(`lowmem.quantize.searched_scales`) weights each column's squared round-trip error by diag(H),
the energy of the input that column multiplies, so a group's scale is chosen for an estimate
of the output error (the diagonal of GPTQ's own objective) rather than the weight error, as
AWQ weighs weights by activation magnitude (Lin et al. 2023, arXiv 2306.00978). ShareGPT,
before training (experiments/quant_options): +0.0575 -> +0.0545 nats against FP32.

Cost: O(D_out D_in^2 / 128) per layer plus one Cholesky of D_in x D_in; SmolLM2-135M quantizes
in a few seconds on 2 cores.
"""

from __future__ import annotations

import torch

from lowmem.models import base_model
from lowmem.quantize import (
    NF4,
    QuantizedWeight,
    absmax_scales,
    check_format,
    dequantize,
    nf4_codes,
    searched_scales,
)

DAMP = 0.01  # of mean(diag H), added to the diagonal
BLOCK = 128  # columns per lazy-update block


def quantize_columns(
    w: torch.Tensor, scale: torch.Tensor, bits: int, codebook: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes, FP32 values) of column(s) `w` (D_out x k) under per-row `scale` (D_out)."""
    if codebook == "nf4":
        codes = nf4_codes((w / scale[:, None]).clamp(-1, 1))
        table = torch.tensor(NF4, device=w.device)
        return codes, table[codes.long()] * scale[:, None]
    offset = 2 ** (bits - 1)
    codes = torch.clamp(torch.round(w / scale[:, None]) + offset, 0, 2**bits - 1)
    return codes.to(torch.uint8), (codes - offset) * scale[:, None]


def group_scale(
    w: torch.Tensor,
    bits: int,
    codebook: str,
    search: bool = False,
    importance: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row FP32 scale of a D_out x group block: absmax (NF4) or absmax / (2^(b-1) - 1), or
    with `search` the shrunk one of least round-trip error (`lowmem.quantize.searched_scales`),
    each column's squared error weighted by `importance` when given."""
    if search:
        return searched_scales(w[:, None, :], bits, codebook, importance)[:, 0]
    return absmax_scales(w, bits, codebook)


def damped_inverse_factor(hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): U upper-triangular with (H + damping)^-1 = U^T U; dead = columns no input ever
    reached (diagonal 0), whose weights cannot matter on X and are set to 0."""
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(DAMP * torch.diag(h).mean())
    h_inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(h_inv, upper=True).float(), dead


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int = 4,
    group_size: int = 32,
    codebook: str = "int",
    act_order: bool = False,
    scale_search: bool = False,
    weighted_search: bool = False,
) -> QuantizedWeight:
    """GPTQ codes of a D_out x D_in weight for inputs with Gram matrix `hessian` (X^T X,
    D_in x D_in), in the symmetric `lowmem.quantize` format (INT or NF4, FP32 scale per group).
    `act_order`: columns in descending diag(H) order, group scales fixed beforehand from the
    weight (static groups; see the module docstring). `scale_search`: each group's scale from
    `group_scale(search=True)` on the columns it is fixed from; `weighted_search`: with each
    column's squared error weighted by diag(H), so the search minimises an estimate of the
    output error (sum over inputs of x_j^2 (w_j - q_j)^2) instead of the weight error."""
    group = check_format(tuple(weight.shape), bits, group_size, codebook)
    d_out, d_in = weight.shape
    w = weight.detach().float().clone()
    w[:, torch.diag(hessian) == 0] = 0  # dead inputs (damped_inverse_factor)
    scales = torch.empty(d_out, d_in // group)
    energy = torch.diag(hessian).float() if weighted_search else None  # in W's column order
    order = torch.arange(d_in)
    if act_order:
        for g in range(d_in // group):
            cols = slice(g * group, (g + 1) * group)
            imp = None if energy is None else energy[cols]
            scales[:, g] = group_scale(w[:, cols], bits, codebook, scale_search, imp)
        order = torch.argsort(torch.diag(hessian), descending=True, stable=True)
        w, hessian = w[:, order], hessian[order][:, order]
    u, _ = damped_inverse_factor(hessian)
    codes = torch.empty(d_out, d_in, dtype=torch.uint8)
    for a in range(0, d_in, BLOCK):
        b = min(a + BLOCK, d_in)
        err = torch.empty(d_out, b - a)
        for i in range(a, b):
            g = int(order[i]) // group  # column i of the walk is column order[i] of W
            if not act_order and i % group == 0:
                imp = None if energy is None else energy[i : i + group]
                scales[:, g] = group_scale(w[:, i : i + group], bits, codebook, scale_search, imp)
            code, value = quantize_columns(w[:, i : i + 1], scales[:, g], bits, codebook)
            codes[:, order[i]] = code[:, 0]
            e = (w[:, i] - value[:, 0]) / u[i, i]
            w[:, i + 1 : b] -= e[:, None] * u[i, i + 1 : b][None, :]
            err[:, i - a] = e
        w[:, b:] -= err @ u[a:b, b:]  # the block's errors, spread over the later columns once
    if bits == 4:
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return QuantizedWeight(codes.contiguous(), scales, None, (d_out, d_in), bits, group, codebook)


def output_error(weight: torch.Tensor, qweight: torch.Tensor, x: torch.Tensor) -> float:
    """Relative output error ||x W^T - x Q^T|| / ||x W^T|| on inputs x (N x D_in)."""
    ref = x @ weight.T
    return float((ref - x @ qweight.T).norm() / ref.norm())


def calibration_ids(dataset, n_tokens: int) -> torch.Tensor:
    """B x T token ids: the first rows of `dataset` (a `lowmem.data` split, rows of T ids,
    e.g. Shakespeare blocks) until they hold `n_tokens` tokens (at least one row)."""
    rows, total = [], 0
    for row in dataset["input_ids"]:
        rows.append(torch.as_tensor(row))
        total += len(row)
        if total >= n_tokens:
            break
    return torch.stack(rows)


@torch.no_grad()
def calibrate(
    model: torch.nn.Module,
    ids: torch.Tensor,
    bits: int = 4,
    group_size: int = 32,
    codebook: str = "int",
    sequential: bool = False,
    act_order: bool = False,
    scale_search: bool = False,
    weighted_search: bool = False,
) -> dict[str, QuantizedWeight]:
    """{parameter name (stock, without peft's `.base_layer`): GPTQ weight} of every decoder
    linear of the FP32 `model` (plain or peft, adapters not yet trained), from one forward of
    `ids` (B x T) through the decoder (no LM head); see the module docstring for how the
    activations are gathered and what `sequential` changes. The model's weights are unchanged."""
    base = base_model(model)
    names = {id(p): n.replace(".base_layer", "") for n, p in base.named_parameters()}
    out: dict[str, QuantizedWeight] = {}
    hooks = []
    for layer in base.model.layers:
        # (input tensor, its H): linears fed the same tensor object share one H; holding the
        # tensor until the layer ends keeps its address from being reused by a later input
        grams: list[tuple[torch.Tensor, torch.Tensor]] = []
        inputs: dict[str, tuple[torch.nn.Linear, int]] = {}
        mine: list = []  # this layer's hooks, removed when it finishes

        def gather(module, args, grams=grams, inputs=inputs):
            k = next((k for k, (t, _) in enumerate(grams) if t is args[0]), len(grams))
            if k == len(grams):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                grams.append((args[0], x.T @ x))
            inputs[names[id(module.weight)]] = (module, k)

        def finish(layer, args, kwargs, output, grams=grams, inputs=inputs, mine=mine):
            for h in mine:
                h.remove()
            for name, (module, k) in inputs.items():
                h = grams[k][1]
                out[name] = gptq_quantize(
                    module.weight,
                    h,
                    bits,
                    group_size,
                    codebook,
                    act_order,
                    scale_search,
                    weighted_search,
                )
            modules = {name: module for name, (module, _) in inputs.items()}
            grams.clear()
            inputs.clear()
            if sequential:  # the next layer sees this layer's output with its weights quantized
                return run_dequantized(layer, args, kwargs, modules, out)
            return None

        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear) and ".lora_" not in f".{name}":
                mine.append(module.register_forward_pre_hook(gather))
        mine.append(layer.register_forward_hook(finish, with_kwargs=True))
        hooks += mine
    try:
        device = next(base.parameters()).device
        base.model(input_ids=ids.to(device), use_cache=False)  # no cache: a layer may run twice
    finally:
        for h in hooks:
            h.remove()
    return out


def run_dequantized(layer, args, kwargs, modules: dict, codes: dict[str, QuantizedWeight]):
    """`layer`'s output on the same inputs with the named linears' weights replaced by their
    dequantized codes (restored afterwards)."""
    kept = {name: m.weight.data for name, m in modules.items()}
    try:
        for name, m in modules.items():
            m.weight.data = dequantize(codes[name]).to(m.weight.dtype)
        return layer(*args, **kwargs)
    finally:
        for name, m in modules.items():
            m.weight.data = kept[name]
