"""The quality table: `lowmem.quality`'s records, averaged over the seeds, against `lora`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from lowmem import results
from lowmem.config import StackConfig
from lowmem.quality import EXPERIMENT, REFERENCE, ROWS, Protocol, row_config


def check_definitions(records: list[dict]) -> None:
    """Refuse a record whose configuration is not what its row defines today: the table labels
    each row with `ROWS[row]`, so a row redefined after its runs (`best_chosen` has been, more
    than once) would otherwise show old numbers under the new definition. A field the record
    lacks (added later) counts as its default."""

    def plain(config: dict) -> dict:  # as JSON holds it: tuples are lists
        return json.loads(json.dumps(config))

    default = plain(StackConfig().to_dict())
    for r in records:
        want = plain(row_config(r["row"], Protocol(), r["seed"]).stack.to_dict())
        have = plain(r["config"])
        diff = {
            k: (have.get(k, default[k]), v) for k, v in want.items() if have.get(k, default[k]) != v
        }
        if diff:
            fields = ", ".join(f"{k}={a!r} (row: {b!r})" for k, (a, b) in sorted(diff.items()))
            raise ValueError(
                f"record {r['run_id']} ran a configuration that row {r['row']!r} no longer "
                f"defines: {fields}; rename it to the row that defines what it ran (e.g. a "
                "`_vN` row kept for the old definition), or run the row again with --force"
            )


def quality_frame(records: list[dict]) -> pd.DataFrame:
    """One line per (task, row): means over the seeds that ran, the spread (sample standard
    deviation, NaN for one seed) and the differences to the reference row paired by seed."""
    runs = pd.DataFrame(
        {
            "task": r["task"]["name"],
            "row": r["row"],
            "seed": r["seed"],
            **{k: r["metrics"][k] for k in ("eval_loss_before", "eval_loss", "perplexity")},
            **{k: r["metrics"][k] for k in ("accuracy", "eval_loss_fp32_base", "grad_cosine")},
            "peak_mib": r["metrics"]["peak_bytes"] / 2**20,
            "step_s": r["metrics"]["step_s_median"],
        }
        for r in records
        if r["status"] == "ok"
    )
    ref = runs[runs["row"] == REFERENCE].set_index(["task", "seed"])
    key = pd.MultiIndex.from_frame(runs[["task", "seed"]])
    runs["vs_ref"] = runs["eval_loss"].to_numpy() - ref["eval_loss"].reindex(key).to_numpy()
    runs["fp32_vs_ref"] = (
        runs["eval_loss_fp32_base"].to_numpy() - ref["eval_loss"].reindex(key).to_numpy()
    )
    runs["time_vs_ref"] = runs["step_s"].to_numpy() / ref["step_s"].reindex(key).to_numpy()
    frame = runs.groupby(["task", "row"]).agg(
        seeds=("seed", "count"),
        eval_loss_before=("eval_loss_before", "mean"),
        eval_loss=("eval_loss", "mean"),
        eval_loss_sd=("eval_loss", "std"),
        vs_ref=("vs_ref", "mean"),
        vs_ref_sd=("vs_ref", "std"),
        perplexity=("perplexity", "mean"),
        accuracy=("accuracy", "mean"),
        fp32_vs_ref=("fp32_vs_ref", "mean"),
        peak_mib=("peak_mib", "max"),
        time_vs_ref=("time_vs_ref", "median"),
        grad_cosine=("grad_cosine", "mean"),
    )
    frame = frame.reset_index()
    frame["order"] = frame["row"].map(list(ROWS).index)
    return frame.sort_values(["task", "order"]).drop(columns="order")


def _pm(mean: float, sd: float, signed: bool = False) -> str:
    """mean ± sd to 4 places; "n/a" where the reference run is missing, no ± for one seed."""
    if not math.isfinite(mean):
        return "n/a"
    text = f"{mean:+.4f}" if signed else f"{mean:.4f}"
    return text + (f" ± {sd:.4f}" if math.isfinite(sd) else "")


def write_table() -> tuple[Path, Path]:
    records = results.load_records(EXPERIMENT)
    if not records:
        raise ValueError(f"no records under {results.results_dir() / 'raw' / EXPERIMENT}")
    check_definitions(records)
    frame = quality_frame(records)
    out = results.results_dir() / "tables"
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "quality.csv", index=False, float_format="%.5f")
    p = Protocol(**{**records[0]["protocol"], "seeds": tuple(records[0]["protocol"]["seeds"])})
    lines = [
        "# quality: held-out exact loss after LoRA fine-tuning under each stack row\n",
        f"{p.model}, {p.steps} steps of {p.batch_size} x {p.seq_len} tokens, AdamW lr {p.lr}, "
        f"training seeds {', '.join(map(str, p.seeds))} (the held-out split fixed: seed "
        f"{p.split_seed}); eval on {p.eval_batches} held-out batches (chat: assistant tokens "
        "only; Shakespeare: whole plays held out), exact softmax, computed through `evaluate` "
        "(lowmem/metrics/). Each cell: mean ± sample standard deviation over the seeds that "
        "ran (`seeds`); vs lora: the difference to the `lora` run of the same seed, then mean ± "
        "sd. Eval loss: the row's own model (its base as the row stores it) + the adapter; on "
        "FP32 base: the same adapter loaded with peft onto the FP32 pretrained model, as it is "
        "deployed, vs lora. Peak: one whole training step, cpu meter. Step time: median "
        "relative to `lora`, from runs that often shared the cores with other jobs (each "
        "record's `conditions` says with what): a rough guide, not a speed measurement "
        "(those: experiments/best_vs_stock/). Generated by `python -m lowmem quality` (or "
        "`python -m lowmem table quality`) from results/raw/quality/.\n",
        "| task | row | stack | seeds | eval loss before -> after | vs lora | perplexity "
        "| next-token acc. | on FP32 base, vs lora | peak MiB | step time | grad cosine |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _, c in frame.iterrows():
        lines.append(
            f"| {c['task']} | {c['row']} | `{ROWS[c['row']]}` | {c['seeds']} | "
            f"{c['eval_loss_before']:.4f} -> {_pm(c['eval_loss'], c['eval_loss_sd'])} | "
            f"{_pm(c['vs_ref'], c['vs_ref_sd'], signed=True)} | {c['perplexity']:.2f} | "
            f"{c['accuracy']:.4f} | {_pm(c['fp32_vs_ref'], math.nan, signed=True)} | "
            f"{c['peak_mib']:.0f} | {c['time_vs_ref']:.2f}x | {c['grad_cosine']:.4f} |"
        )
    (out / "quality.md").write_text("\n".join(lines) + "\n")
    return out / "quality.csv", out / "quality.md"
