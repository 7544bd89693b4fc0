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
after it are logged once, by the run that redoes them; a last line torn by the kill is such a
step's and goes too, while any other unreadable line is refused (naming file and line).
Everything here is created with the modes the user's umask gives (`lowmem.files`).

Size: LoRA tensors + two AdamW moments = 12 B per trainable parameter: Llama-3.2 3B, r = 16 on
q_proj and v_proj: 4.59e6 x 12 B = 52.5 MiB per checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lowmem.files import seal, temp_folder, write_atomic
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
    """Fill a temporary folder beside `path` with `write(tmp)`, then swap it in atomically.
    The folder and its files get the modes of `lowmem.files` (the umask decides)."""
    tmp = temp_folder(path)
    old = path.with_name(path.name + ".old")
    try:
        write(tmp)
        seal(tmp)
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
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


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
    """The LoRA adapter in PEFT format, as `out/adapter/`, replaced atomically.

    Its `base_model_name_or_path` names a base that stock tools load, so that
    `peft.AutoPeftModelForCausalLM.from_pretrained(out / "adapter")` works
    (`lowmem.export.loadable_base`): the absolute path of the user's `model_path` directory;
    for a registered model whose weights are a GGUF asset (`smollm2-135m`), its FP32 base
    exported once into the lowmem cache (the first time: one more load of the GGUF, ~15 s, and
    513 MiB of disk); for random weights, which no tool can load, what peft wrote."""
    from lowmem.export import loadable_base  # here: the rest of resume needs no model code

    base = loadable_base(model)

    def write(folder: Path) -> None:
        # LoRA never trains the embedding: no need for peft to look for a changed vocabulary
        model.save_pretrained(str(folder), save_embedding_layers=False)
        if base is not None:
            config = json.loads((folder / "adapter_config.json").read_text())
            config["base_model_name_or_path"] = base
            (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")

    replace_dir(out / "adapter", write)
    return out / "adapter"


def append_log(out: Path, entry: dict) -> None:
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")


def read_log(out: str | Path) -> list[dict]:
    """The entries of `out/log.jsonl`. A last line that lacks its newline and is cut-off JSON
    is the append a killed run left torn, and is left out; any other line that is not a JSON
    object with an integer "step" is refused with one line naming the file and the line."""
    path = Path(out) / "log.jsonl"
    if not path.is_file():
        return []
    *lines, last = path.read_bytes().split(b"\n")  # last: b"" when the file ends with "\n"
    entries = [_log_entry(path, n, line) for n, line in enumerate(lines, 1) if line.strip()]
    if last.strip() and (entry := _log_entry(path, len(lines) + 1, last, torn=True)):
        entries.append(entry)
    return entries


def _log_entry(path: Path, n: int, line: bytes, torn: bool = False) -> dict | None:
    """Line `n` of the log as an entry; None for a `torn` line that does not decode."""
    try:
        entry = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as err:
        why = f"not UTF-8: {err.reason}"
    except json.JSONDecodeError as err:
        why = f"bad JSON: {err.msg} at column {err.colno}"
    else:
        if isinstance(entry, dict) and type(entry.get("step")) is int:
            return entry
        why, torn = 'not an object with an integer "step"', False
    if torn:
        return None
    raise ValueError(
        f"{path} line {n}: not a log entry ({why}); lowmem writes this file: restore it, "
        "delete that line, or start the run again in a new out_dir"
    )


def _truncate_log(out: Path, step: int) -> None:
    """Drop log lines past `step` (-1: all): the resumed run redoes (and logs) those steps.
    A run killed while appending a line tore a line of a step after its last checkpoint (a step
    and its evaluation are logged before the step is checkpointed): read_log leaves it out and
    this rewrite removes it."""
    path = out / "log.jsonl"
    text = "".join(json.dumps(e) + "\n" for e in read_log(out) if e["step"] <= step)
    if not path.is_file() or path.read_bytes() != text.encode():
        write_atomic(path, text)


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
