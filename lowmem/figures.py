"""Figures (seaborn PNGs in results/figures/), built from the records only.

- `context`: peak memory vs context length, a line per stack row, one panel per model, log
  scales; the paper's values dashed beside ours, the A100's 80 GiB as a horizontal line (our
  OOM cells show the predicted need above it).
- `waterfall`: at 2048 tokens, the GiB each technique saves over the row before it, ours beside
  the paper's (symmetric log scale: the first savings are tens of GiB, the last a few hundred
  MiB, and a technique that costs memory shows below zero).
- `softmax_k`: peak vs the subset size K of the softmax approximation, per rule and variant
  (log scales).
- `trainable_fraction`: peak vs the share of trainable positions, per stack row.

`python -m lowmem figures` draws every figure whose records exist and lists what it wrote.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from lowmem import paper, results, tables  # noqa: E402
from lowmem.config import LABELS, ROWS  # noqa: E402
from lowmem.files import new_file  # noqa: E402

A100_GIB = paper.A100_BYTES / 2**30
WATERFALL_CONTEXT = 2048


def context_frame(records: list[dict]) -> pd.DataFrame:
    """Long format for `context`: ours (ok and oom) and the paper's numeric cells."""
    frame = tables.cell_frame(records)
    frame = frame[frame["status"] != "failed"]
    ours = frame.assign(source="ours")[["model", "stack", "label", "seq_len", "peak_gib", "source"]]
    theirs = frame[frame["paper_gib"].notna()].assign(source="paper", peak_gib=frame["paper_gib"])
    return pd.concat([ours, theirs[ours.columns]], ignore_index=True)


def waterfall_frame(records: list[dict], seq_len: int = WATERFALL_CONTEXT) -> pd.DataFrame:
    """GiB saved by each paper technique over the row before it, ours and the paper's."""
    frame = tables.cell_frame(records)
    frame = frame[(frame["seq_len"] == seq_len) & (frame["stack"] != "best")]
    rows = []
    for model, cells in frame.groupby("model"):
        cells = cells.set_index("stack")
        order = [s for s in ROWS if s in cells.index]
        for before, after in itertools.pairwise(order):
            for source, column in (("ours", "peak_gib"), ("paper", "paper_gib")):
                saved = cells.at[before, column] - cells.at[after, column]
                rows.append(
                    {
                        "model": model,
                        "technique": LABELS[after],
                        "source": source,
                        "saved_gib": saved,
                    }
                )
    return pd.DataFrame(rows)


def draw_context(records: list[dict], path: Path) -> Path:
    frame = context_frame(records)
    grid = sns.relplot(
        data=frame,
        x="seq_len",
        y="peak_gib",
        hue="label",
        hue_order=[LABELS[s] for s in ROWS if s in set(frame["stack"])],
        style="source",
        col="model",
        kind="line",
        markers=True,
        height=4,
        aspect=1.1,
    )
    grid.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="peak GiB")
    for ax in grid.axes.flat:
        ax.axhline(A100_GIB, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xticks(paper.CONTEXTS, [str(c) for c in paper.CONTEXTS])
    return _save(grid.figure, path)


def draw_waterfall(records: list[dict], path: Path) -> Path:
    frame = waterfall_frame(records)
    grid = sns.catplot(
        data=frame, x="technique", y="saved_gib", hue="source", col="model", kind="bar", height=4
    )
    grid.set(yscale="symlog", ylabel=f"GiB saved at {WATERFALL_CONTEXT} tokens", xlabel="")
    grid.tick_params(axis="x", rotation=30)
    return _save(grid.figure, path)


def draw_ablation(records: list[dict], path: Path, x: str, hue: str, style: str | None) -> Path:
    frame = tables.config_frame(records)
    frame = frame[frame["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(6, 4))
    sns.lineplot(
        data=frame,
        x=x,
        y="peak_gib",
        hue=hue,
        style=style or hue,
        markers=True,
        dashes=False,
        ax=ax,
    )
    ax.set(ylabel="peak GiB", title=", ".join(sorted(set(frame["model"]))), yscale="log")
    if x == "softmax_k":
        ax.set_xscale("log")
    return _save(fig, path)


FIGURES = {
    "context": ("table1", draw_context),
    "waterfall": ("table1", draw_waterfall),
    "softmax_k": (
        "softmax_k",
        lambda r, p: draw_ablation(r, p, "softmax_k", "softmax_rule", "softmax_variant"),
    ),
    "trainable_fraction": (
        "trainable_fraction",
        lambda r, p: draw_ablation(r, p, "trainable_fraction", "stack", None),
    ),
}


def draw_all() -> list[Path]:
    """Every figure whose experiment has records; results/figures/<name>.png."""
    written = []
    for name, (experiment, draw) in FIGURES.items():
        records = [r for r in results.load_records(experiment) if r["status"] != "failed"]
        if records:
            written.append(draw(records, results.results_dir() / "figures" / f"{name}.png"))
    return written


def _save(fig: plt.Figure, path: Path) -> Path:
    """Write the PNG whole or not at all (`lowmem.files.new_file`): never a half-written figure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with new_file(path) as tmp:
            fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)
    return path
