"""Profile files: a configuration the budget planner chose, for `train --profile FILE`,
`measure --profile FILE` and `lowmem.prepare(model, FILE)`.

JSON: {"format": "lowmem-profile", "settings": the flat technique settings with the row
("stack"), "batch_size": the micro-batch, "grad_accum": micro-batches per optimizer step,
"planned_for": what the planner predicted (model, budget, seq_len, peaks, step time)}.
"""

from __future__ import annotations

import json
from pathlib import Path

from lowmem.config import BENCHMARK_INPUTS, StackConfig, Techniques
from lowmem.files import write_atomic

PROFILE_FORMAT = "lowmem-profile"


def write_profile(path: str | Path, cfg: StackConfig, grad_accum: int, planned_for: dict) -> Path:
    """Write `cfg`'s settings and micro-batch as a profile file (atomically)."""
    settings = {k: v for k, v in cfg.to_dict().items() if k not in BENCHMARK_INPUTS}
    data = {
        "format": PROFILE_FORMAT,
        "settings": settings,
        "batch_size": cfg.batch_size,
        "grad_accum": grad_accum,
        "planned_for": planned_for,
    }
    path = Path(path)
    write_atomic(path, json.dumps(data, indent=2, default=list) + "\n")
    return path


def read_profile(path: str | Path) -> dict:
    """A profile file written by `BudgetPlan.write_profile`: {"settings": flat settings with
    the stack, "batch_size": micro-batch, "grad_accum": micro-batches per step, ...}, checked
    by building its configuration."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"bad profile file {str(path)!r}: {err}") from None
    if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
        raise ValueError(f"bad profile file {str(path)!r}: not a {PROFILE_FORMAT} file")
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in data["settings"].items()}
    Techniques.from_flat(**settings)  # refuses a bad setting, naming it
    return {**data, "settings": settings}
