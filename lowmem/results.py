"""Result records: one JSON file per run (the tables built from them: `lowmem.tables`).

A record says what ran and what it measured: status (ok | oom | failed), model, config,
metrics (bytes and GiB), meter, device, library versions and the git commit. Records are
written atomically (temporary file + rename), so a killed run never leaves a partial record,
and a run whose record exists is skipped unless forced: an OOM is a result, too. A record's
file name is built from validated, slug-safe parts only (`check_slug`: no separators, no
'..'), and names the weights when they came from a directory (a hash of config + tensor
index), so a path in a configuration can never place a file outside results/, and two
different checkpoints never share a record.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from lowmem.config import StackConfig, describe
from lowmem.files import write_atomic

STATUSES = ("ok", "oom", "failed")
_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")
REPO_ROOT = Path(__file__).resolve().parents[1]


def results_dir() -> Path:
    return Path(os.environ.get("LOWMEM_RESULTS", REPO_ROOT / "results"))


def run_id(model: str, cfg: StackConfig, meter: str, weights: dict | None = None) -> str:
    """<model>__<stack>__T<seq_len>__<meter>, then every config field that is not the default
    (but offload_dir: where files wait changes no byte of a step), then w<hash> of the weights
    when they came from a directory (`lowmem.models.weights_identity`), so different weights
    never share a record."""
    parts = [model, cfg.stack, f"T{cfg.seq_len}", meter, *config_parts(cfg)]
    parts += [f"w{weights['sha256'][:16]}"] if weights else []
    return check_slug("run id", "__".join(parts))


def config_parts(cfg: StackConfig) -> list[str]:
    """The non-default fields of `cfg` as `field=value` name parts, offload_dir left out."""
    extra = describe(cfg.with_settings(offload_dir="")).partition(":")[2]
    return list(filter(None, extra.split(",")))


_SLUG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+=-]*")


def check_slug(kind: str, name: object) -> str:
    """`name` if it is safe as one file name (no separators, no '..'); else one clear error."""
    if not (isinstance(name, str) and _SLUG.fullmatch(name) and ".." not in name):
        raise ValueError(
            f"bad {kind} {name!r}: must be letters, digits and _ . + = - (starting with a "
            "letter or digit; no path separators or '..')"
        )
    return name


def record_path(experiment: str, rid: str) -> Path:
    check_slug("experiment", experiment)
    return results_dir() / "raw" / experiment / f"{check_slug('run id', rid)}.json"


def environment() -> dict:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.machine(),
        "versions": versions,
        **code_state(),
    }


def code_state() -> dict:
    """The commit (and whether lowmem/ had uncommitted changes) of the code this process runs:
    the repository's state when the process imported lowmem, which a long job outlives. If the
    repository has moved on since, `changed_while_running` gives its state now."""
    now = _git_state()
    if now == _AT_IMPORT:
        return dict(_AT_IMPORT)
    return {**_AT_IMPORT, "changed_while_running": now}


def _git_state() -> dict:
    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True)
        except OSError:  # no git on this machine
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "HEAD") or None
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "lowmem"))
    return {"commit": commit, "dirty": dirty}


_AT_IMPORT = _git_state()  # `import lowmem` imports this module: the code the process runs


def cell_record(
    run_id: str,
    model: str,
    cfg: StackConfig,
    meter: str,
    metrics: dict,
    status: str = "ok",
    device: str | None = "cpu",
    weights: dict | None = None,
    error: str | None = None,
    **extra,
) -> dict:
    """A record of one run of `cfg` on `model`: what ran (configuration as given and resolved,
    weights, meter, device, environment) beside what it measured; `extra` adds fields."""
    from lowmem.models import registered_mlp_width  # here: models imports transformers

    return {
        "run_id": run_id,
        "status": status,
        "model": model,
        "weights": weights,
        "config": cfg.to_dict(),
        # what ran: no `auto` left
        "resolved_config": cfg.resolved(mlp_width=registered_mlp_width(model)).to_dict(),
        "meter": meter,
        "device": device,
        "metrics": metrics,
        "error": error,
        **extra,
        "environment": environment(),
    }


def write_record(experiment: str, record: dict) -> Path:
    """Write `record` as results/raw/<experiment>/<run_id>.json, atomically."""
    if record.get("status") not in STATUSES:
        raise ValueError(f"record status {record.get('status')!r} must be one of {STATUSES}")
    path = record_path(experiment, record["run_id"])
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        **record,
        "experiment": experiment,
        "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_atomic(path, json.dumps(record, indent=2, sort_keys=True) + "\n")  # umask decides mode
    return path


def load_records(experiment: str) -> list[dict]:
    folder = results_dir() / "raw" / check_slug("experiment", experiment)
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
