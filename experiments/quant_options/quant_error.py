"""Quantization error per layer of each quantization option on SmolLM2-135M (real weights).

    python experiments/quant_options/quant_error.py   # 10-25 min on 2 cores; one record

Text: Shakespeare blocks of 128 tokens (`lowmem.data.shakespeare`, the first 8 plays, held out
by play). Calibration: the first 512 training tokens (`lowmem.gptq.calibration_ids`); held
out: the first 512 tokens of the held-out play(s). For every decoder linear: weight relative
error ||W - W_hat|| / ||W||, output relative error ||X W^T - X W_hat^T|| / ||X W^T|| with X the
FP32 model's inputs to that layer on held-out text (and, for GPTQ, on the calibration text).
`search-` / `gptq_search-`: RTN / GPTQ with `scale_search` (each group's scale searched).
`-g16`: groups of 16 with FP16 scales (`quant_group_size=16,quant_scale_dtype=fp16`: the same
0.625 B per weight as groups of 32 with FP32 scales; session 13's `best_chosen` format).
LoftQ (r = 16, alpha = 32, q_proj and v_proj: the default adapters) counts base + s B A as
W_hat. The tied embedding / LM head: weight error at INT4, NF4, INT8. The model: held-out loss
with every weight replaced by its W_hat (no training). Writes
results/raw/quant_options/smollm2-135m__quant_error.json.
"""

from __future__ import annotations

import statistics
import time

import torch

from lowmem.data import shakespeare
from lowmem.gptq import calibrate, calibration_ids
from lowmem.loftq import loftq_init
from lowmem.models import build_model, load_tokenizer
from lowmem.quantize import dequantize, quantize, with_scale_dtype
from lowmem.results import environment, write_record

TOKENS, BLOCK, R, ALPHA = 512, 128, 16, 32


def layer_inputs(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """{linear name: its FP32 input on `ids`, N x D_in} for every decoder linear."""
    seen, hooks = {}, []
    for name, m in model.model.layers.named_modules():
        if isinstance(m, torch.nn.Linear):
            key = f"model.layers.{name}.weight"

            def hook(module, args, key=key):
                seen[key] = args[0].reshape(-1, args[0].shape[-1]).detach()

            hooks.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return seen


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def held_out_loss(model, weights: dict[str, torch.Tensor], ids: torch.Tensor) -> float:
    """Mean next-token loss on `ids` with the named weights replaced (restored afterwards)."""
    params = dict(model.named_parameters())
    kept = {n: params[n].detach().clone() for n in weights}
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w)
        loss = float(model(input_ids=ids, labels=ids).loss)
        for n, w in kept.items():
            params[n].copy_(w)
    return loss


def main() -> None:
    start = time.time()
    model = build_model("smollm2-135m", init="pretrained").eval()
    tok = load_tokenizer("smollm2-135m")
    task = shakespeare(tok, BLOCK, plays=8)
    cal = calibration_ids(task.train, TOKENS)
    test = calibration_ids(task.test, TOKENS)
    x_cal, x_test = layer_inputs(model, cal), layer_inputs(model, test)
    params = dict(model.named_parameters())
    linears = list(x_test)
    fp32 = {n: params[n].detach().clone() for n in linears}
    options: dict[str, dict[str, torch.Tensor]] = {}
    for book in ("int", "nf4"):
        options[f"rtn-{book}"] = {n: dequantize(quantize(fp32[n], codebook=book)) for n in linears}
        options[f"search-{book}"] = {
            n: dequantize(quantize(fp32[n], codebook=book, scale_search=True)) for n in linears
        }
        gptq = calibrate(model, cal, 4, 32, book)
        options[f"gptq-{book}"] = {n: dequantize(gptq[n]) for n in linears}
        gptq = calibrate(model, cal, 4, 32, book, scale_search=True)
        options[f"gptq_search-{book}"] = {n: dequantize(gptq[n]) for n in linears}
        options[f"rtn-g16-{book}"] = {
            n: dequantize(with_scale_dtype(quantize(fp32[n], 4, 16, codebook=book), "fp16"))
            for n in linears
        }
        gptq = calibrate(model, cal, 4, 16, book, scale_search=True)
        options[f"gptq_search-g16-{book}"] = {
            n: dequantize(with_scale_dtype(gptq[n], "fp16")) for n in linears
        }
        for iters in (1, 5):
            loftq = dict(options[f"rtn-{book}"])
            for n in linears:
                if n.endswith(("q_proj.weight", "v_proj.weight")):
                    q, a, b = loftq_init(fp32[n], R, ALPHA / R, iters, 4, 32, book)
                    loftq[n] = dequantize(q) + ALPHA / R * b @ a
            options[f"loftq{iters}-{book}"] = loftq
    layers = []
    for n in linears:
        y_test, y_cal = x_test[n] @ fp32[n].T, x_cal[n] @ fp32[n].T
        row = {"layer": n.removeprefix("model.layers.").removesuffix(".weight")}
        for opt, ws in options.items():
            row[f"{opt}.weight"] = rel(ws[n], fp32[n])
            row[f"{opt}.output"] = rel(x_test[n] @ ws[n].T, y_test)
            if not opt.startswith("loftq"):
                row[f"{opt}.output_cal"] = rel(x_cal[n] @ ws[n].T, y_cal)
        layers.append(row)
    summary = {
        key: {"mean": statistics.mean(r[key] for r in layers), "max": max(r[key] for r in layers)}
        for key in layers[0]
        if key != "layer"
    }
    emb_name = "model.embed_tokens.weight"
    emb = params[emb_name].detach().clone()
    tables = {
        "int4": dequantize(quantize(emb, 4, 32)),
        "nf4": dequantize(quantize(emb, 4, 32, codebook="nf4")),
        "int8": dequantize(quantize(emb, 8, 32)),
    }
    vocab = {
        name: {"weight": rel(t, emb), "bytes": quantize(emb, int(name[-1]), 32).nbytes}
        for name, t in tables.items()
    }
    loss = {"fp32": held_out_loss(model, {}, test)}
    for opt, ws in options.items():
        for table in ("int4", "int8") if opt.endswith("int") else ("nf4", "int8"):
            loss[f"{opt}+vocab-{table}"] = held_out_loss(
                model, {**ws, emb_name: tables[table]}, test
            )
    record = {
        "run_id": "smollm2-135m__quant_error",
        "status": "ok",
        "model": "smollm2-135m",
        "config": {
            "bits": 4,
            "group_size": 32,  # 16 for the `-g16` options (FP16 scales)
            "calib_tokens": TOKENS,
            "block": BLOCK,
            "lora_r": R,
            "lora_alpha": ALPHA,
            "text": "shakespeare, first 8 plays",
            "held_out_plays": list(task.held_out),
        },
        "meter": None,
        "device": "cpu",
        "metrics": {
            "layers": layers,
            "summary": summary,
            "vocab": vocab,
            "held_out_loss": loss,
            "seconds": time.time() - start,
        },
        "environment": environment(),
    }
    path = write_record("quant_options", record)
    print(path)
    for key, s in summary.items():
        print(f"{key:28s} mean {s['mean']:.4f} max {s['max']:.4f}")
    print(vocab)
    for k, v in loss.items():
        print(f"{k:28s} {v:.4f}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
