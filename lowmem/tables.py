"""Tables built from result records only (`lowmem.results`): a CSV in long format (one row
per cell) and Markdown in the paper's layout, each cell "ours / paper (ours / paper ratio)";
ablation tables for the other grids; the README's Table 1 block.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lowmem import paper
from lowmem.config import LABELS, ROWS
from lowmem.results import REPO_ROOT, load_records, results_dir

TOLERANCE = 0.10  # a numeric paper cell is reproduced when ours is within +-10% of it


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
