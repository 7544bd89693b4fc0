"""Held-out loss of each quantized base BEFORE training, as the quality protocol builds it.

    python experiments/quant_options/before_scan.py [--options a,b] [--tasks sharegpt]
    python experiments/quant_options/before_scan.py --table   # the Markdown table only
    python experiments/quant_options/before_scan.py --heldout fresh --tasks sharegpt [--table]

The quality protocol (`lowmem.quality`) trains 200 steps per row; after training the gap to
FP32 LoRA was about 0.63x the gap before it (ShareGPT, seed 0: best_chosen 0.201 -> 0.127,
int4 0.337 -> 0.189). So the held-out loss of the quantized base with the untrained adapter
ranks the options in a few minutes each instead of 30. Each option is built exactly as a
quality run builds its row (`lowmem.quality.spec_config`, `lowmem.train.training_model` with
the task's training split for calibration, seed 0) and evaluated as the run's step-0
evaluation is (`lowmem.step.evaluate`, the protocol's batches). One record per (task, option):
results/raw/quant_options/<task>__<option>__before.json (skipped when it exists, unless
--force). No memory is metered here (meter "none"); the timings are the process's wall clock.

`--heldout fresh` (ShareGPT only) evaluates on text no option was ever chosen on: the FRESH
usable conversations after the protocol's first `limit` (which hold its train and held-out
splits), all of them, as one more held-out set; calibration still reads the protocol's training
split. `best_chosen` was picked by its loss on the protocol's held-out split, so its gap there
may be biased low; the gap on the fresh set is not. Records:
results/raw/quant_options/sharegpt__<option>__fresh.json. Shakespeare has no unused text (all
38 plays are in the protocol).
"""

from __future__ import annotations

import argparse
import json
import time

from lowmem import results
from lowmem.data import load_task
from lowmem.models import load_tokenizer
from lowmem.quality import FRESH, ROWS, TASKS, Protocol, fresh_heldout, spec_config
from lowmem.step import evaluate
from lowmem.train import training_model

EXPERIMENT = "quant_options"
V1 = "best:quant_codebook=nf4,quant_vocab_bits=8,quant_method=gptq,quant_loftq_iters"
SEQ_ACT = V1 + "=1,quant_calib_tokens=8192,quant_gptq_sequential=true,quant_gptq_act_order=true"
OPTIONS = {  # name -> stack spec; "fp32" is the reference every gap is taken against
    "fp32": ROWS["lora"],
    "int4": ROWS["int4"],
    "gptq_v1": ROWS["gptq_v1"],  # GPTQ alone at the field defaults (512 tokens, FP32-fed)
    "gptq": ROWS["gptq"],  # GPTQ alone, 8192 tokens, sequential
    "best_chosen_v1": ROWS["best_chosen_v1"],  # = V1 + "=1" (512 calibration tokens)
    "calib2048": V1 + "=1,quant_calib_tokens=2048",
    "calib8192": V1 + "=1,quant_calib_tokens=8192",
    "calib32768": V1 + "=1,quant_calib_tokens=32768",
    "calib8192_seq": V1 + "=1,quant_calib_tokens=8192,quant_gptq_sequential=true",
    "calib8192_seq_act": SEQ_ACT,
    "calib8192_seq_act_loftq0": SEQ_ACT.replace("loftq_iters=1", "loftq_iters=0"),
    "calib8192_seq_act_loftq5": SEQ_ACT.replace("loftq_iters=1", "loftq_iters=5"),
    "calib8192_seq_act_keep": SEQ_ACT + ",quant_loftq_keep_codes=true",  # GPTQ codes + SVD
    "calib8192_seq_act_loftq0_search": SEQ_ACT.replace("loftq_iters=1", "loftq_iters=0")
    + ",quant_scale_search=true",
    "calib8192_seq_act_loftq0_wsearch": SEQ_ACT.replace("loftq_iters=1", "loftq_iters=0")
    + ",quant_scale_search=true,quant_gptq_weighted_search=true",
    # FP16 scales, groups of 16: the same bytes as FP32 groups of 32 (lowmem.quantize)
    "calib8192_seq_act_loftq0_search_g16": SEQ_ACT.replace("loftq_iters=1", "loftq_iters=0")
    + ",quant_scale_search=true,quant_group_size=16,quant_scale_dtype=fp16",
    "calib8192_seq_act_loftq0_wsearch_g16": SEQ_ACT.replace("loftq_iters=1", "loftq_iters=0")
    + ",quant_scale_search=true,quant_gptq_weighted_search=true,quant_group_size=16"
    + ",quant_scale_dtype=fp16",
    "calib32768_seq_act_loftq0_search": SEQ_ACT.replace("loftq_iters=1", "loftq_iters=0").replace(
        "calib_tokens=8192", "calib_tokens=32768"
    )
    + ",quant_scale_search=true",
}
REFERENCE = "fp32"
HELDOUT = {"protocol": "before", "fresh": "fresh"}  # held-out set -> record name suffix


def run_id(task: str, option: str, heldout: str = "protocol") -> str:
    return f"{task}__{option}__{HELDOUT[heldout]}"


def scan_one(task, task_name: str, option: str, protocol: Protocol, fresh=None) -> dict:
    """Build `option` on `task` as a seed-0 quality run would and evaluate it untrained, on the
    protocol's held-out batches or, given `fresh` rows, on all of them."""
    cfg = spec_config(OPTIONS[option], protocol, seed=0)
    heldout, batches = ("protocol", protocol.eval_batches) if fresh is None else ("fresh", 0)
    start = time.perf_counter()
    with training_model(protocol.model, cfg.stack, init="pretrained", train_ds=task.train) as m:
        built = time.perf_counter()
        ds = task.test if fresh is None else fresh
        loss = evaluate(m, cfg.stack, ds, protocol.batch_size, batches)
    done = time.perf_counter()
    record = {
        "run_id": run_id(task_name, option, heldout),
        "status": "ok",
        "model": protocol.model,
        "task": task_name,
        "option": option,
        "spec": OPTIONS[option],
        "protocol": {k: v for k, v in vars(protocol).items() if k != "seeds"},
        "config": cfg.stack.to_dict(),
        "heldout": "protocol"
        if fresh is None
        else f"fresh: ShareGPT usable conversations {protocol.limit}-{protocol.limit + FRESH - 1}"
        f" (0-based), {len(fresh)} rows",
        "meter": "none",
        "device": "cpu",
        "metrics": {
            "eval_loss_before": loss,
            "build_s": round(built - start, 1),
            "eval_s": round(done - built, 1),
        },
        "environment": results.environment(),
    }
    results.write_record(EXPERIMENT, record)
    return record


def table(tasks=TASKS, heldout: str = "protocol") -> str:
    """Markdown: held-out loss before training and the gap to fp32, per option and task."""
    loaded = {}
    for task in tasks:
        for option in OPTIONS:
            path = results.record_path(EXPERIMENT, run_id(task, option, heldout))
            if path.exists():
                loaded[task, option] = json.loads(path.read_text())["metrics"]
    head = "| option | " + " | ".join(f"{t} loss | {t} gap" for t in tasks) + " | build s |"
    lines = [head, "|" + "---|" * (2 * len(tasks) + 2)]
    for option in OPTIONS:
        cells, build = [], []
        for task in tasks:
            got, ref = loaded.get((task, option)), loaded.get((task, REFERENCE))
            loss = got["eval_loss_before"] if got else None
            gap = loss - ref["eval_loss_before"] if got and ref else None
            cells += [f"{loss:.4f}" if got else "-", f"{gap:+.4f}" if gap is not None else "-"]
            build += [f"{got['build_s']:.0f}"] if got else []
        if any(c != "-" for c in cells):
            lines.append(f"| {option} | " + " | ".join(cells) + f" | {' / '.join(build)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--options", default=",".join(OPTIONS))
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--heldout", choices=tuple(HELDOUT), default="protocol")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--table", action="store_true", help="print the table and stop")
    args = parser.parse_args()
    tasks, options = args.tasks.split(","), args.options.split(",")
    unknown = sorted(set(options) - set(OPTIONS)) + sorted(set(tasks) - set(TASKS))
    if unknown:
        raise SystemExit(f"unknown option/task {unknown[0]!r}: options {', '.join(OPTIONS)}")
    if args.heldout == "fresh" and tasks != ["sharegpt"]:
        raise SystemExit(
            f"--heldout fresh needs --tasks sharegpt (got {args.tasks!r}): only "
            "ShareGPT has text outside the protocol"
        )
    if not args.table:
        protocol, tokenizer = Protocol(), load_tokenizer(Protocol().model)
        for task_name in tasks:
            limit = protocol.limit if task_name == "sharegpt" else protocol.plays or None
            task = load_task(task_name, tokenizer, protocol.seq_len, limit=limit, seed=0)
            fresh = fresh_heldout(tokenizer, protocol) if args.heldout == "fresh" else None
            for option in options:
                if results.record_path(
                    EXPERIMENT, run_id(task_name, option, args.heldout)
                ).exists():
                    if not args.force:
                        continue
                rec = scan_one(task, task_name, option, protocol, fresh)
                m = rec["metrics"]
                print(
                    f"{task_name} {option}: {m['eval_loss_before']:.4f} "
                    f"(build {m['build_s']} s, eval {m['eval_s']} s)",
                    flush=True,
                )
    print(table(tasks, args.heldout))


if __name__ == "__main__":
    main()
