"""Result records (one JSON file per run) and the tables built from them.

A record says what ran and what it measured: status (ok | oom | failed), model, config,
metrics (bytes and GiB), meter, device, library versions and the git commit. Records are
written atomically (temporary file + rename), so a killed run never leaves a partial record,
and a run whose record exists is skipped unless forced: an OOM is a result, too. A record's
file name is built from validated, slug-safe parts only (`check_slug`: no separators, no
'..'), and names the weights when they came from a directory (a hash of config + tensor
index), so a path in a configuration can never place a file outside results/, and two
different checkpoints never share a record.

Tables are built from records only: a CSV in long format (one row per cell) and Markdown in the
paper's layout, each cell "ours / paper (ours / paper ratio)".
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import pandas as pd

from lowmem import paper
from lowmem.config import LABELS, ROWS, StackConfig, describe
from lowmem.files import write_atomic

STATUSES = ("ok", "oom", "failed")
TOLERANCE = 0.10  # a numeric paper cell is reproduced when ours is within +-10% of it
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
    extra = describe(dataclasses.replace(cfg, offload_dir="")).partition(":")[2]
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
        **_git_state(),
    }


def _git_state() -> dict:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "HEAD") or None
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "lowmem"))
    return {"commit": commit, "dirty": dirty}


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


def cell_frame(records: list[dict]) -> pd.DataFrame:
    """Long format: one row per record, with the paper's value and whether it is reproduced."""
    rows = []
    for r in records:
        model, stack, seq_len = r["model"], r["config"]["stack"], r["config"]["seq_len"]
        try:
            ref = paper.paper_gib(model, stack, seq_len)
            in_paper = True
        except KeyError:
            ref, in_paper = None, False
        ours = r["metrics"].get("peak_gib")
        rows.append(
            {
                "model": model,
                "stack": stack,
                "label": LABELS[stack],
                "seq_len": seq_len,
                "meter": r["meter"],
                "status": r["status"],
                "peak_gib": ours,
                "paper_gib": ref,
                "paper_oom": in_paper and ref is None,
                "ratio": ours / ref if ours is not None and ref else None,
                "reproduced": _reproduced(r["status"], ours, ref) if in_paper else None,
                "bytes_per_parameter": r["metrics"].get("bytes_per_parameter"),
            }
        )
    return pd.DataFrame(rows)


def _reproduced(status: str, ours: float | None, ref: float | None) -> bool:
    if ref is None:  # the paper ran out of memory: so must we, on the same 80 GiB budget
        return status == "oom"
    return status == "ok" and abs(ours / ref - 1) <= TOLERANCE


def markdown_table(frame: pd.DataFrame) -> str:
    """The paper's layout: a block per model, a row per stack row, a column per context."""
    contexts = sorted(frame["seq_len"].unique())
    lines = [
        "| Model | Method | " + " | ".join(str(c) for c in contexts) + " |",
        "|---|---|" + "---|" * len(contexts),
    ]
    for model in [m for m in paper.paper_models() if m in set(frame["model"])] + sorted(
        set(frame["model"]) - set(paper.paper_models())
    ):
        for stack in [s for s in ROWS if s in set(frame["stack"])]:
            cells = frame[(frame["model"] == model) & (frame["stack"] == stack)]
            if cells.empty:
                continue
            row = [_cell(cells[cells["seq_len"] == c]) for c in contexts]
            lines.append(f"| {model} | {LABELS[stack]} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _cell(cells: pd.DataFrame) -> str:
    if cells.empty:
        return ""
    c = cells.iloc[0]
    if c["status"] == "failed":
        return "failed"
    ours = f"{c['peak_gib']:.2f}" if c["status"] == "ok" else f"OOM ({c['peak_gib']:.1f})"
    if c["paper_oom"]:
        ref = "OOM"
    elif pd.notna(c["paper_gib"]):
        ref = f"{c['paper_gib']:.2f} ({c['ratio']:.2f})"
    else:
        return ours
    mark = "" if c["reproduced"] else " ✗"
    return f"{ours} / {ref}{mark}"


def config_frame(records: list[dict]) -> pd.DataFrame:
    """One row per record: model, meter, status, peak and every config field (tuples joined)."""
    rows = []
    for r in records:
        config = {k: "+".join(v) if isinstance(v, list) else v for k, v in r["config"].items()}
        rows.append(
            {
                "model": r["model"],
                "meter": r["meter"],
                "status": r["status"],
                "label": LABELS[config["stack"]],
                **config,
                "peak_gib": r["metrics"].get("peak_gib"),
                "peak_phase": r["metrics"].get("peak_phase"),
            }
        )
    return pd.DataFrame(rows)


def ablation_markdown(frame: pd.DataFrame) -> str:
    """A row per cell; columns: the settings that vary across cells, then the peak."""
    fixed = ("status", "label", "peak_gib", "peak_phase")
    varying = [c for c in frame.columns if c not in fixed and frame[c].nunique() > 1]
    frame = frame.sort_values(varying, key=_stack_order) if varying else frame
    lines = [
        "| " + " | ".join([*varying, "peak GiB", "peak phase"]) + " |",
        "|" + "---|" * (len(varying) + 2),
    ]
    for _, c in frame.iterrows():
        peak = "failed" if c["status"] == "failed" else f"{c['peak_gib']:.3f}"
        peak += " (OOM)" if c["status"] == "oom" else ""
        cells = [*(str(c[k]) for k in varying), peak, str(c["peak_phase"] or "")]
        lines.append("| " + " | ".join(cells) + " |")
    same = {k: frame[k].iloc[0] for k in frame.columns if k not in fixed and k not in varying}
    return (
        "\n".join(lines)
        + "\n\nSame in every cell: "
        + ", ".join(f"{k}={v}" for k, v in same.items() if k in ("model", "meter", "stack"))
        + " (other fields at their defaults in `lowmem/config.py`).\n"
    )


def _paper_layout(records: list[dict]) -> bool:
    """Whether the records are one per (model, row, context, meter), as in the paper's table."""
    keys = [(r["model"], r["config"]["stack"], r["config"]["seq_len"], r["meter"]) for r in records]
    return len(set(keys)) == len(keys)


def write_tables(experiment: str, name: str | None = None) -> tuple[Path, Path]:
    """results/tables/<name>.csv and .md from the experiment's records.

    Paper cells get the paper's layout with its values beside ours; an ablation (several cells
    per paper cell, or cells the paper lacks) gets one row per cell and its varying settings.
    """
    records = load_records(experiment)
    if not records:
        raise ValueError(f"no records under {results_dir() / 'raw' / experiment}")
    if not _paper_layout(records):
        return _write(experiment, name, config_frame(records), ablation_markdown)
    frame = cell_frame(records)
    frame = frame.sort_values(["model", "stack", "seq_len", "meter"], key=_stack_order)

    def layout(frame: pd.DataFrame) -> str:
        return (
            f"Each cell: ours / paper (ours / paper). OOM = above the A100's 80 GiB, with our "
            f"predicted need in parentheses. ✗ = outside ±{TOLERANCE:.0%} of the paper, or OOM "
            "disagreeing with it.\n\n"
            + markdown_table(frame)
            + _storage_note(frame)
            + _headline_note(frame)
        )

    return _write(experiment, name, frame, layout)


def _write(experiment: str, name: str | None, frame: pd.DataFrame, layout) -> tuple[Path, Path]:
    out = results_dir() / "tables"
    out.mkdir(parents=True, exist_ok=True)
    csv, md = out / f"{name or experiment}.csv", out / f"{name or experiment}.md"
    frame.to_csv(csv, index=False, float_format="%.4f")
    meters = ", ".join(sorted(frame["meter"].unique()))
    md.write_text(
        f"# {name or experiment}: peak memory (GiB) of one forward + backward, batch 1\n\n"
        f"Meter: {meters}. Generated by `python -m lowmem table {experiment}` from "
        f"results/raw/{experiment}/.\n\n" + layout(frame)
    )
    return csv, md


def _storage_note(frame: pd.DataFrame) -> str:
    """Stored base-model bytes per parameter of the quantized rows, beside the paper's 0.625."""
    quant = frame[(frame["stack"] != "baseline") & (frame["stack"] != "lora")]
    if quant.empty or quant["bytes_per_parameter"].isna().all():
        return ""
    lines = [
        "\nStored base model, bytes per parameter (rows from `+ Quantization` on; the "
        "paper's numbers imply 0.625):\n"
    ]
    for model, value in quant.groupby("model")["bytes_per_parameter"].max().items():
        lines.append(f"- {model}: {value:.4f}")
    return "\n".join(lines) + "\n"


def _headline_note(frame: pd.DataFrame) -> str:
    """The paper's headline ratios (+ LoRA / final row), ours beside theirs, and `best`."""
    lines = []
    ok = frame[frame["status"] == "ok"].set_index(["model", "stack", "seq_len"])["peak_gib"]
    for model, (seq_len, theirs) in paper.HEADLINE.items():
        try:
            ours = ok[model, "lora", seq_len] / ok[model, "logits_mask", seq_len]
        except KeyError:
            continue
        lines.append(
            f"- {model} at {seq_len}: + LoRA / + Logits Masking = {ours:.1f}x (paper {theirs}x)"
        )
        if (model, "best", seq_len) in ok.index:
            best = ok[model, "lora", seq_len] / ok[model, "best", seq_len]
            lines.append(f"- {model} at {seq_len}: + LoRA / best = {best:.1f}x")
    return "\nHeadline ratios:\n\n" + "\n".join(lines) + "\n" if lines else ""


README_START, README_END = "<!-- table1:start -->", "<!-- table1:end -->"


def readme_block(experiment: str = "table1") -> str:
    """The README's results block: the table in the paper's layout and the headline ratios."""
    frame = cell_frame(load_records(experiment))
    return markdown_table(frame) + _headline_note(frame)


def update_readme(experiment: str = "table1", readme: Path = REPO_ROOT / "README.md") -> bool:
    """Paste the experiment's table between the README's markers; True if the text changed."""
    text = readme.read_text()
    head, sep, rest = text.partition(README_START)
    _, sep2, tail = rest.partition(README_END)
    if not (sep and sep2):
        raise ValueError(f"{readme} lacks the markers {README_START} ... {README_END}")
    new = f"{head}{README_START}\n{readme_block(experiment)}{README_END}{tail}"
    readme.write_text(new)
    return new != text


def _stack_order(column: pd.Series) -> pd.Series:
    return column.map(ROWS.index) if column.name == "stack" else column
