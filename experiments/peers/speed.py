"""Step time of the peers beside lowmem's rows: real tensors, CPU, one thread, one process.

SmolLM2-135M architecture (random weights: time does not depend on their values), batch 1, the
last 30% of positions trainable. Every row is built first; then a warm-up round (not timed: it
also compiles CCE's `torch_compile` implementation) and `--repeats` timed rounds, each running
every row's forward + loss + backward once, the order rotated by one row each round, so that no
row always runs first or after the same neighbour. The peers use real bitsandbytes (loaded with
`from_pretrained(quantization_config=...)`) and CCE compiled, as a user would run them. Reports
each row's min and median, both relative to `best`, and its step time against `best`'s round
by round (`rounds_vs_best`: per-round ratios, their median, rounds slower, the exact sign
test's p-value; `lowmem.speed.paired`). One record per context length:
results/raw/peers/smollm2-135m__speed__T<seq_len>__cpu.json.

    OMP_NUM_THREADS=1 python experiments/peers/speed.py [--seq-len 256 1024] [--repeats 3]
        [--rows lora best best:mlp_first=off hf-qlora] [--experiment peers]

A row is a peer (lowmem.peers.PEERS) or one of our rows as a stack spec (`best:mlp_first=off`).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

from lowmem import results
from lowmem.checkpoint import checkpointing_of
from lowmem.config import parse_spec
from lowmem.loss import compute_loss
from lowmem.models import build_model
from lowmem.peers import PEERS, PeerConfig, build_peer, peer_loss
from lowmem.speed import paired
from lowmem.stack import apply_stack, benchmark_batch

EXPERIMENT = "peers"
MODEL = "smollm2-135m"
OURS = ("lora", "best")
ROWS = (*OURS, *PEERS)


def build_row(row: str, seq_len: int) -> tuple[torch.nn.Module, object, dict]:
    """(model, loss function of (model, batch), batch) of one row."""
    if row not in PEERS:
        cfg = parse_spec(row, seq_len=seq_len)
        torch.manual_seed(cfg.seed)
        model = apply_stack(build_model(MODEL), cfg)
        batch = benchmark_batch(cfg, model.config.vocab_size)
        return model, functools.partial(compute_loss, cfg=cfg), batch
    cfg = PeerConfig(row, seq_len=seq_len)
    model = build_peer(MODEL, cfg, "cpu")
    batch = benchmark_batch(cfg.stack_config(), model.config.vocab_size)
    batch.pop("trainable_index", None)
    return model, functools.partial(peer_loss, cfg=cfg), batch


def step_seconds(model: torch.nn.Module, loss_fn, batch: dict) -> float:
    start = time.perf_counter()
    loss_fn(model, batch)[0].backward()  # only the loss is kept, as a training loop does
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def time_rows(rows: tuple[str, ...], seq_len: int, repeats: int) -> dict:
    built = {row: build_row(row, seq_len) for row in rows}
    warmup = {row: step_seconds(*built[row]) for row in rows}  # compiles CCE
    times: dict[str, list[float]] = {row: [] for row in rows}
    orders = []
    for k in range(repeats):
        order = rows[k % len(rows) :] + rows[: k % len(rows)]
        orders.append(list(order))
        for row in order:
            times[row].append(step_seconds(*built[row]))
            print(f"T={seq_len} round {k} {row}: {times[row][-1]:.3f} s", flush=True)
    for model, _, _ in built.values():
        state = checkpointing_of(model)
        if state is not None:
            state.close()
    out = {
        row: {
            "steps_s": t,
            "min_s": min(t),
            "median_s": statistics.median(t),
            "warmup_s": warmup[row],
        }
        for row, t in times.items()
    }
    if "best" in out:
        for name, row in out.items():
            row["min_vs_best"] = row["min_s"] / out["best"]["min_s"]
            row["median_vs_best"] = row["median_s"] / out["best"]["median_s"]
            row["rounds_vs_best"] = paired(times[name], times["best"])
    return {"rows": out, "orders": orders}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), help="peers or stack specs")
    parser.add_argument("--experiment", default=EXPERIMENT, help="folder under results/raw/")
    args = parser.parse_args()
    for row in args.rows:
        try:
            row in PEERS or parse_spec(row)  # a bad row: one line, before anything is built
        except ValueError as err:
            parser.error(str(err))
    from measure import peer_versions  # experiments/peers/measure.py, beside this script

    for seq_len in args.seq_len:
        start = time.perf_counter()
        timed = time_rows(tuple(args.rows), seq_len, args.repeats)
        record = {
            "run_id": f"{MODEL}__speed__T{seq_len}__cpu",
            "status": "ok",
            "model": MODEL,
            "weights": {"path": None, "init": "random"},
            "config": {
                "rows": args.rows,
                "seq_len": seq_len,
                "repeats": args.repeats,
                "warmup_rounds": 1,
                "threads": torch.get_num_threads(),
                "trainable_fraction": 0.3,
            },
            "meter": "wall clock (time.perf_counter), no memory meter",
            "device": "cpu",
            "metrics": timed,
            "notes": [
                "peers with real bitsandbytes NF4 (from_pretrained, double quantization)",
                "cut-cross-entropy impl='torch_compile' compiled by torch.compile (inductor, "
                "CPU); its Triton 'cce' kernel needs a GPU and was not measured",
            ],
            "peer_versions": peer_versions(),
            "elapsed_s": round(time.perf_counter() - start, 2),
            "environment": results.environment(),
        }
        path = results.write_record(args.experiment, record)
        print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
