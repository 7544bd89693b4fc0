"""What a training run leaves in its folder, written so that a killed run resumes bit-exactly.

A run folder (`out_dir`) holds:

- `run.json`: what the run is (its TrainConfig and the caller's tags: model, task). A folder
  holding another run is refused, and so is resuming with a different configuration;
- `checkpoint/state.pt`: everything a resumed run needs that the base model does not hold:
  the LoRA tensors, the AdamW moments, the LR schedule, the RNG states (torch, Python, numpy,
  CUDA), the step and the data position (micro-batches consumed). The data order needs no
  state of its own: it is a function of (seed, epoch) (`lowmem.step.BatchOrder`);
- `adapter/`: the LoRA adapter in PEFT format, loadable with stock `PeftModel.from_pretrained`
  onto the plain FP32 model. Quantization, checkpointing and caching replace the frozen base
  layers only, so peft's keys (`...q_proj.lora_A.weight`) are the same on every stack row;
- `log.jsonl`: one line per step and per evaluation; `summary.json` at the end.

Atomicity: a checkpoint (or adapter) is written into a temporary folder beside it, flushed to
disk, then renamed into place; the previous one is first renamed to `checkpoint.old` and
removed only after the new one is in place. At every instant a complete checkpoint exists under
one of the two names, and `load_checkpoint` takes `checkpoint/` if present, else
`checkpoint.old/`. Resuming also cuts `log.jsonl` back to the checkpoint's step, so the steps
after it are logged once, by the run that redoes them.

Size: LoRA tensors + two AdamW moments = 12 B per trainable parameter: Llama-3.2 3B, r = 16 on
q_proj and v_proj: 4.59e6 x 12 B = 52.5 MiB per checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lowmem.memory import GiB

STATE_FILE = "state.pt"


def check_run(out: Path, identity: dict, resume: bool) -> None:
    """Refuse a folder that holds another run, or this run when resume is off."""
    identity = json.loads(json.dumps(identity))  # tuples -> lists, as run.json holds them
    run_file = out / "run.json"
    if run_file.is_file():
        if not resume:
            raise ValueError(
                f"out_dir {str(out)!r} already holds a run (run.json); pass resume=True "
                "(--resume) to continue it, or choose another out_dir"
            )
        diff = _differences(json.loads(run_file.read_text()), identity)
        if diff:
            raise ValueError(
                f"cannot resume {str(out)!r}: it holds a different run ("
                + "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, a, b in diff)
                + ")"
            )
    elif out.exists() and any(out.iterdir()):
        raise ValueError(
            f"out_dir {str(out)!r} is not empty and holds no lowmem run (no run.json); "
            "choose a new or empty folder"
        )


def open_run(out: Path, identity: dict, resume: bool) -> dict | None:
    """Check (or create) a run folder; return the checkpoint to resume from, or None."""
    check_run(out, identity, resume)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp"):  # left by a process killed while writing
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    write_json(out / "run.json", json.loads(json.dumps(identity)))
    state = load_checkpoint(out)
    _truncate_log(out, state["step"] if state else -1)
    return state


def _differences(saved: dict, now: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((prefix + key, a, b))
    return out


def replace_dir(path: Path, write: Callable[[Path], None]) -> None:
    """Fill a temporary folder beside `path` with `write(tmp)`, then swap it in atomically."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = path.with_name(path.name + ".old")
    try:
        write(tmp)
        for file in tmp.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, obj: object) -> None:
    """Write JSON atomically: a temporary file beside `path`, then a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(out: Path, model, optimizer, scheduler, step: int, position: int) -> None:
    device = next(model.parameters()).device
    state = {
        "step": step,
        "position": position,
        "lora": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": _rng_state(device),
    }

    def write(folder: Path) -> None:
        torch.save(state, folder / STATE_FILE)
        (folder / "meta.json").write_text(json.dumps({"step": step, "position": position}))

    replace_dir(out / "checkpoint", write)


def load_checkpoint(out: str | Path) -> dict | None:
    out = Path(out)
    for folder in (out / "checkpoint", out / "checkpoint.old"):
        if (folder / STATE_FILE).is_file():
            return torch.load(folder / STATE_FILE, weights_only=True)
    return None


def restore(state: dict, model, optimizer, scheduler) -> None:
    """Put a checkpoint's LoRA tensors, optimizer, schedule and RNG states back in place."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state["lora"]):
        missing = sorted(set(params) ^ set(state["lora"]))[:3]
        raise ValueError(f"checkpoint does not fit this model's LoRA parameters: {missing}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state["lora"][name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"], next(model.parameters()).device)


def _rng_state(device: torch.device) -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_adapter(model, out: Path) -> Path:
    """The LoRA adapter in PEFT format, as `out/adapter/`, replaced atomically."""
    # LoRA never trains the embedding: no need for peft to look for a changed vocabulary
    replace_dir(
        out / "adapter", lambda f: model.save_pretrained(str(f), save_embedding_layers=False)
    )
    return out / "adapter"


def append_log(out: Path, entry: dict) -> None:
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")


def read_log(out: str | Path) -> list[dict]:
    path = Path(out) / "log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_log(out: Path, step: int) -> None:
    """Drop log lines past `step` (-1: all): the resumed run redoes (and logs) those steps."""
    entries = read_log(out)
    kept = [e for e in entries if e["step"] <= step]
    if kept != entries or not (out / "log.jsonl").is_file():
        fd, tmp = tempfile.mkstemp(dir=out, prefix=".log.jsonl.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.writelines(json.dumps(e) + "\n" for e in kept)
        os.replace(tmp, out / "log.jsonl")


def summarize(entries: list[dict], meter: str) -> dict:
    """Final and per-step train losses, eval losses, peak memory and speed of a run's log."""
    steps = [e for e in entries if "loss" in e]
    evals = [e for e in entries if "eval_loss" in e]
    peak = max((e["peak_bytes"] for e in steps if e["peak_bytes"] is not None), default=None)
    return {
        "steps": len(steps),
        "final_loss": steps[-1]["loss"] if steps else None,
        "losses": [e["loss"] for e in steps],
        "eval_losses": [[e["step"], e["eval_loss"]] for e in evals],
        "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "meter": meter,
        "peak_bytes": peak,
        "peak_gib": None if peak is None else peak / GiB,
        "step_s_median": statistics.median(e["step_s"] for e in steps) if steps else None,
        "tokens_per_s_median": (
            statistics.median(e["tokens_per_s"] for e in steps) if steps else None
        ),
    }
