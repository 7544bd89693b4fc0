"""Command line: `python -m lowmem {measure,speed,grid,table1,table,figures,train,quality,assets,
export-base,convert,budget,clean} --help`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from lowmem import assets, results
from lowmem.cli import build_parser
from lowmem.config import ROWS, StackConfig, parse_spec
from lowmem.offload import OffloadError, check_offload_root
from lowmem.options import given_fields
from lowmem.settings import parse_value


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(__doc__)
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

    options = {  # lora_targets stays a string: comma-separated, as LoraSettings splits it
        k: v if k == "lora_targets" else parse_value(StackConfig, k, v)
        for k, v in given_fields(args, StackConfig).items()
    }
    stack, profile, micro = _profile(args)  # measure runs one micro-batch
    options = {**profile, "batch_size": micro.get("batch_size", 1), **options}
    cfg = parse_spec(f"{stack}:{','.join(args.set)}", **options)
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

    counts = run_grid(args.folder, args.force, args.meter, args.executor, args.address)
    print(", ".join(f"{n} {k}" for k, n in counts.items()), file=sys.stderr)
    return 0


def _table(args: argparse.Namespace) -> int:
    from lowmem import tables  # pandas (+64 MiB RSS): only the commands that write tables

    if args.experiment == "quality":
        from lowmem.quality_table import write_table

        csv, md = write_table()
    else:
        csv, md = tables.write_tables(args.experiment)
    if args.experiment == "table1" and tables.update_readme("table1"):
        print("updated the results table in README.md", file=sys.stderr)
    print(md.read_text())
    print(f"wrote {csv} and {md}", file=sys.stderr)
    return 0


def _quality(args: argparse.Namespace) -> int:
    from lowmem import quality
    from lowmem.quality_table import write_table

    for name in args.tasks or ():
        if name not in quality.TASKS:
            raise ValueError(f"unknown task {name!r}; choose from {', '.join(quality.TASKS)}")
    for row in args.rows or ():
        if row not in quality.ROWS:
            raise ValueError(f"unknown row {row!r}; choose from {', '.join(quality.ROWS)}")
    protocol = quality.Protocol()
    for seed in args.seeds or ():
        if seed < 0:
            raise ValueError(f"seed {seed} is negative; seeds are integers >= 0")
    if args.seeds:
        protocol = dataclasses.replace(protocol, seeds=tuple(args.seeds))
    quality.run(
        args.tasks or quality.TASKS, args.rows or quality.PRIORITY, protocol, force=args.force
    )
    print(write_table()[1].read_text())
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

    from lowmem.converted import check_loadable
    from lowmem.models import get_spec, load_config, read_config
    from lowmem.resume import check_run
    from lowmem.train import make_config, run_identity, train, training_model

    stack, profile, micro = _profile(args)
    batch_size = args.batch_size if args.batch_size is not None else micro.get("batch_size", 4)
    grad_accum = args.grad_accum if args.grad_accum is not None else micro.get("grad_accum", 1)
    cfg = make_config(
        stack,
        args.set,
        **profile,
        seq_len=args.seq_len,
        steps=args.steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
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
    if args.model_path is not None:  # a converted directory this row cannot load
        check_loadable(Path(args.model_path), cfg.stack)
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
    with training_model(args.model, cfg.stack, init, device, args.model_path, train_ds) as model:
        summary = train(model, cfg, train_ds, eval_ds, args.out, args.resume, args.meter, tags)
    print(json.dumps(summary, indent=2))
    return 0


def _profile(args: argparse.Namespace) -> tuple[str, dict, dict]:
    """The row, the settings and the micro-batch (batch_size, grad_accum) of --profile FILE."""
    if args.profile is None:
        return args.stack or "lora", {}, {}
    from lowmem.profile_file import read_profile

    data = read_profile(args.profile)
    settings = dict(data["settings"])
    stack = settings.pop("stack")
    if args.stack not in (None, stack):
        raise ValueError(
            f"bad --stack {args.stack}: the profile file {args.profile} is for {stack}; give one"
        )
    return stack, settings, {k: data[k] for k in ("batch_size", "grad_accum")}


def _check_offload(cfg) -> None:
    """Refuse a bad offload folder before any work, where the row writes to one."""
    if cfg.enabled("checkpoint") and cfg.checkpoint.offload == "disk":
        check_offload_root(cfg.checkpoint.offload_dir)


def _export_base(args: argparse.Namespace) -> int:
    from lowmem.export import export_base

    print(export_base(args.model, args.out_dir, args.model_path))
    return 0


def _convert(args: argparse.Namespace) -> int:
    from lowmem.convert import convert
    from lowmem.converted import MANIFEST

    settings = {  # lora_targets stays a string: comma-separated, as StackConfig splits it
        k: v if k == "lora_targets" else parse_value(StackConfig, k, v)
        for k, v in given_fields(args, StackConfig).items()
    }
    out = convert(args.model_dir, args.out_dir, args.profile, force=args.force, **settings)
    manifest = json.loads((out / MANIFEST).read_text())
    print(
        f"{manifest['parameters']} parameters in {manifest['tensor_bytes']} bytes "
        f"({manifest['bytes_per_parameter']:.4f} per parameter)",
        file=sys.stderr,
    )
    print(out)
    return 0


def _budget(args: argparse.Namespace) -> int:
    from lowmem.planner import plan_budget

    if args.write is not None and not args.write.endswith(".json"):
        raise ValueError(f"bad --write {args.write!r}: must name a .json file")
    plan = plan_budget(args.model, args.budget, args.seq_len, args.batch_size)
    print(plan.table())
    if plan.chosen is None:
        return 1
    print(f"chosen: {plan.chosen.row()['settings']}")
    if args.write is not None:
        print(plan.write_profile(args.write))
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
    "convert": _convert,
    "budget": _budget,
    "clean": _clean,
}

if __name__ == "__main__":
    sys.exit(main())
