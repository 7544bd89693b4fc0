"""Peak memory of the peers beside lowmem's `best`, in one run, under one meter.

Llama-3.2 3B, one forward + loss + backward step, batch 1, the last 30% of positions
trainable, at the paper's five contexts (shortest first). `best` is re-measured here with
`lowmem.bench.run_cell`; each peer with `lowmem.peers.measure_peer` (the same tracker, through
`lowmem.meter.measure_step`). One JSON record per cell in results/raw/peers/; cells whose
record exists are skipped unless --force.

    python experiments/peers/measure.py [--contexts 1024 2048] [--rows best hf-qlora] [--force]

Under `--meter cuda` (a GPU machine) CCE runs its Triton kernel (`impl="cce"`) and `--standin`
quantizes with bitsandbytes' `quantize_4bit` on the built model instead of writing the FP32 model
to disk and loading it back through `from_pretrained` (the same peak on the cpu meter:
tests/test_peers.py); the run id says `standin`.
"""

from __future__ import annotations

import argparse
import time
import traceback
from importlib import metadata

from lowmem import paper, results
from lowmem.bench import run_cell
from lowmem.config import StackConfig
from lowmem.peers import PEER_PACKAGES, PEERS, PeerConfig, bnb_config, measure_peer

EXPERIMENT = "peers"
MODEL = "llama-3.2-3b"
ROWS = ("best", *PEERS)


def peer_versions() -> dict:
    versions = {}
    for name in PEER_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def recipe(cfg: PeerConfig) -> dict:
    """The peer's recipe as a user would write it, for the record."""
    quant = {k: str(v) for k, v in bnb_config().to_dict().items() if k.startswith(("bnb", "load"))}
    return {
        "quantization_config": quant,
        "prepare_model_for_kbit_training": {"use_gradient_checkpointing": True},
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "lora": {"r": cfg.r, "alpha": cfg.alpha, "dropout": 0.0, "targets": list(cfg.targets)},
        "loss": {
            "hf-qlora": "model(input_ids, labels=labels).loss (transformers ForCausalLMLoss)",
            "hf-qlora-torchtune": f"torchtune CEWithChunkedOutputLoss({cfg.chunks}) on "
            f"{cfg.chunks} head chunks",
            "hf-qlora-cce": f"cut_cross_entropy.linear_cross_entropy(shift=True, "
            f"impl={cfg.cce_impl!r})"
            + (
                " on the hidden states and head weight cast to BF16"
                if cfg.cce_impl == "cce"
                else ""
            ),
        }[cfg.peer],
        "kept_through_backward": "the loss only (the logits are dropped, as a training loop does)",
    }


def peer_record(model: str, cfg: PeerConfig, meter: str, standin: bool | None = None) -> dict:
    """One peer cell's record, in the shape of `lowmem.results.cell_record`'s."""
    parts = [model, cfg.peer, f"T{cfg.seq_len}", meter] + (["standin"] if standin else [])
    rid = results.check_slug("run id", "__".join(parts))
    start = time.perf_counter()
    metrics, notes, status, error = {}, [], "ok", None
    try:
        metrics, notes = measure_peer(model, cfg, meter, standin)
        if meter == "simulated" and metrics["peak_bytes"] > paper.A100_BYTES:
            status, metrics["budget_bytes"] = "oom", paper.A100_BYTES
    except Exception as err:  # a crash is a result too
        status, error = "failed", "".join(traceback.format_exception(err))[-4000:]
    config = {**cfg.to_dict(), "recipe": recipe(cfg)}
    return {
        "run_id": rid,
        "status": status,
        "model": model,
        "row": cfg.peer,
        "label": PEERS[cfg.peer],
        "weights": {"path": None, "init": "fake" if meter == "simulated" else "random"},
        "config": config,
        "resolved_config": config,
        "meter": meter,
        "device": "cuda" if meter == "cuda" else "cpu",
        "metrics": metrics,
        "error": error,
        "stand_ins": notes,
        # CCE's own Triton kernel ("cce") runs on CUDA only; elsewhere its torch_compile impl
        "cuda_kernel_measured": cfg.peer == "hf-qlora-cce" and cfg.cce_impl == "cce",
        "peer_versions": peer_versions(),
        "elapsed_s": round(time.perf_counter() - start, 2),
        "environment": results.environment(),
    }


def best_record(model: str, seq_len: int, meter: str) -> dict:
    record = run_cell(model, StackConfig(stack="best", seq_len=seq_len), meter)
    return {**record, "row": "best", "label": "lowmem best (exact loss)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=list(paper.CONTEXTS))
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--meter", default="simulated")
    parser.add_argument("--standin", action="store_true", help="bnb NF4 stand-in on real tensors")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    cce_impl = "cce" if args.meter == "cuda" else PeerConfig.cce_impl
    standin = True if args.standin else None
    for seq_len in sorted(args.contexts):
        for row in args.rows:
            peer_standin = args.standin and row != "best"
            parts = [args.model, row, f"T{seq_len}", args.meter] + ["standin"] * peer_standin
            rid = "__".join(parts)
            if results.record_path(EXPERIMENT, rid).exists() and not args.force:
                print(f"skip {rid} (recorded)", flush=True)
                continue
            if row == "best":
                record = best_record(args.model, seq_len, args.meter)
            else:
                cfg = PeerConfig(row, seq_len=seq_len, cce_impl=cce_impl)
                record = peer_record(args.model, cfg, args.meter, standin)
            assert record["run_id"] == rid, (record["run_id"], rid)
            results.write_record(EXPERIMENT, record)
            gib = record["metrics"].get("peak_gib")
            print(f"{rid}: {record['status']} {gib} GiB in {record['elapsed_s']} s", flush=True)


if __name__ == "__main__":
    main()
