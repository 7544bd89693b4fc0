"""Print the README tables of experiments/quant_options from its records (paste the output)."""

import json
from pathlib import Path

RAW = Path(__file__).resolve().parents[2] / "results" / "raw"
err = json.loads((RAW / "quant_options" / "smollm2-135m__quant_error.json").read_text())["metrics"]
s = err["summary"]
print("| option | weight rel. error (mean / max) | output error held-out | calib. |")
print("|---|---|---|---|")
for opt in (
    f"{method}-{book}"
    for book in ("int", "nf4")
    for method in ("rtn", "search", "gptq", "gptq_search", "loftq1", "loftq5", "rtn-g16")
    + ("gptq_search-g16",)
):
    cal = s.get(f"{opt}.output_cal")
    print(
        f"| {opt} | {s[f'{opt}.weight']['mean']:.4f} / {s[f'{opt}.weight']['max']:.4f} | "
        f"{s[f'{opt}.output']['mean']:.4f} / {s[f'{opt}.output']['max']:.4f} | "
        + (f"{cal['mean']:.4f} / {cal['max']:.4f} |" if cal else "- |")
    )
print("\n| vocabulary table | weight rel. error | bytes |\n|---|---|---|")
for k, v in err["vocab"].items():
    print(f"| {k} | {v['weight']:.4f} | {v['bytes']:,} |")
print("\n| weights (no training) | held-out loss | vs FP32 |\n|---|---|---|")
for k, v in err["held_out_loss"].items():
    print(f"| {k} | {v:.4f} | {v - err['held_out_loss']['fp32']:+.4f} |")
print("\n| T | best today (B) | chosen, session 10 (B) | diff | chosen, FP16 g16 (B) | diff |")
print("|---|---|---|---|---|---|")
chosen = (  # quality.ROWS["best_chosen"], session 10 (measure_3b.sh)
    "__quant_codebook=nf4__quant_method=gptq__quant_calib_tokens=8192"
    "__quant_gptq_sequential=True__quant_gptq_act_order=True__quant_vocab_bits=8"
)
chosen16 = "__quant_group_size=16__quant_scale_dtype=fp16" + chosen  # session 13


def cell(path: Path, base: int) -> str:
    if not path.exists():
        return "not measured | |"
    peak = json.loads(path.read_text())["metrics"]["peak_bytes"]
    return f"{peak:,} | {(peak / base - 1) * 100:+.2f}% |"


for t in (1024, 2048, 4096, 8192, 16384):
    name = f"llama-3.2-3b__best__T{t}__simulated"
    today = RAW / "quant_options" / f"{name}.json"
    today = today if today.exists() else RAW / "table1" / f"{name}.json"
    base = json.loads(today.read_text())["metrics"]["peak_bytes"]
    print(
        f"| {t} | {base:,} ({today.parent.name}) | "
        f"{cell(RAW / 'quant_options' / f'{name}{chosen}.json', base)} "
        f"{cell(RAW / 'quant_options' / f'{name}{chosen16}.json', base)}"
    )
