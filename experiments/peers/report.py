"""Table and figure of the peers experiment, from its records only.

    python experiments/peers/report.py

Writes results/tables/peers.md (+ peers.csv, long format) and results/figures/peers.png.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from lowmem import paper, results  # noqa: E402
from lowmem.files import new_file  # noqa: E402
from lowmem.peers import PEERS  # noqa: E402

EXPERIMENT = "peers"
MODEL = "llama-3.2-3b"  # the figure's model
LABELS = {"best": "lowmem best (exact loss)", **PEERS}
ORDER = list(LABELS)


def memory_frame(records: list[dict]) -> pd.DataFrame:
    rows = []
    for r in records:
        if r["run_id"].split("__")[1] == "speed":
            continue
        rows.append(
            {
                "model": r["model"],
                "row": r["row"],
                "label": LABELS[r["row"]],
                "seq_len": r["config"]["seq_len"],
                "meter": r["meter"],
                "status": r["status"],
                "peak_bytes": r["metrics"].get("peak_bytes"),
                "peak_gib": r["metrics"].get("peak_gib"),
                "peak_phase": r["metrics"].get("peak_phase"),
                "peak_op": r["metrics"].get("peak_op"),
                "resident_gib": (r["metrics"].get("resident_bytes") or 0) / 2**30,
                "stand_ins": "; ".join(r.get("stand_ins", [])),
                "commit": r["environment"]["commit"],
            }
        )
    frame = pd.DataFrame(rows)
    best = frame[frame["row"] == "best"].set_index(["model", "seq_len", "meter"])["peak_gib"]
    keys = list(zip(frame["model"], frame["seq_len"], frame["meter"], strict=True))
    frame["vs_best"] = [
        g / best.get(k, float("nan")) for g, k in zip(frame["peak_gib"], keys, strict=True)
    ]
    return frame


def table1_best(model: str) -> dict[int, float]:
    """Table 1's committed `best` records (simulated), to show the re-measured ones agree."""
    out = {}
    for r in results.load_records("table1"):
        cfg = r["config"]
        if r["model"] == model and cfg["stack"] == "best" and r["meter"] == "simulated":
            out[cfg["seq_len"]] = r["metrics"]["peak_gib"]
    return out


def speed_frame(records: list[dict]) -> pd.DataFrame:
    rows = []
    for r in records:
        if r["run_id"].split("__")[1] != "speed":
            continue
        for row, m in r["metrics"]["rows"].items():
            rows.append(
                {
                    "row": row,
                    "label": LABELS.get(row, "lowmem + LoRA (FP32)" if row == "lora" else row),
                    "seq_len": r["config"]["seq_len"],
                    "repeats": r["config"]["repeats"],
                    "min_s": m["min_s"],
                    "median_s": m["median_s"],
                    "min_vs_best": m.get("min_vs_best"),
                    "median_vs_best": m.get("median_vs_best"),
                }
            )
    return pd.DataFrame(rows)


def markdown(mem: pd.DataFrame, speed: pd.DataFrame) -> str:
    lines = ["# Peers: what users would pick instead, measured beside `best`", ""]
    rank = {"simulated": 0, "cpu": 1, "cuda": 2}  # the tables' meter, then the real ones
    groups = sorted(mem.groupby(["model", "meter"], sort=False), key=lambda g: rank[g[0][1]])
    for (model, meter), cells in groups:
        contexts = sorted(cells["seq_len"].unique())
        lines += [
            f"## Peak memory of one step, {model}, `{meter}` meter (GiB; x = peer / best)",
            "",
            "| Row | " + " | ".join(str(t) for t in contexts) + " |",
            "|---" * (len(contexts) + 1) + "|",
        ]
        for row in [r for r in ORDER if r in set(cells["row"])]:
            by_t = cells[cells["row"] == row].set_index("seq_len")
            out = []
            for t in contexts:
                if t not in by_t.index:
                    out.append("")
                    continue
                c = by_t.loc[t]
                text = f"{c.peak_gib:.2f}" if c.status == "ok" else f"{c.status} ({c.peak_gib:.1f})"
                out.append(text if row == "best" else f"{text} ({c.vs_best:.1f}x)")
            lines.append(f"| {LABELS[row]} | " + " | ".join(out) + " |")
        if meter == "cuda":
            lines += [
                "",
                'On the GPU, CCE runs its Triton kernel (`impl="cce"`), which takes half '
                "precision only: the hidden states and the head weight are cast to BF16 at the "
                "loss (the copy counts); the rest is the stock recipe in FP32, with the NF4 "
                "stand-in quantized by bitsandbytes on CUDA. Why both rows sit above their "
                "simulated figures: experiments/peers/README.md.",
            ]
        committed = table1_best(model) if meter == "simulated" else {}
        if committed:
            cells_t1 = [f"{committed[t]:.2f}" if t in committed else "" for t in contexts]
            lines.append("| best, Table 1's record | " + " | ".join(cells_t1) + " |")
        lines.append("")
    lines += meter_check(mem)
    if not speed.empty:
        lines += [
            "## Step time, SmolLM2-135M, real CPU, one thread (s; rows interleaved, order "
            "rotated each round)",
            "",
            "| Row | T | repeats | min | median | min / best | median / best |",
            "|---|---|---|---|---|---|---|",
        ]
        rank = {row: i for i, row in enumerate(["lora", *ORDER])}
        speed = speed.assign(rank=speed["row"].map(rank)).sort_values(["seq_len", "rank"])
        for _, s in speed.iterrows():
            lines.append(
                f"| {s.label} | {s.seq_len} | {s.repeats} | {s.min_s:.2f} | {s.median_s:.2f} "
                f"| {s.min_vs_best:.2f} | {s.median_vs_best:.2f} |"
            )
        lines.append("")
    lines += [
        "Simulated peers: bitsandbytes cannot wrap fake tensors, so `lowmem.peers."
        "standin_linear4bit` stands in (the same `bnb.nn.Linear4bit`, `quantize_4bit` with "
        "double quantization and `matmul_4bit`; equal to real bitsandbytes' peak on the cpu "
        "meter). CCE's `torch_compile` implementation runs eagerly under our meters "
        "(torch.compile refuses a dispatch mode); its CUDA kernel under the `cuda` meter only. "
        "Records: results/raw/peers/; how they were made: experiments/peers/README.md.",
        "",
    ]
    return "\n".join(lines)


def meter_check(mem: pd.DataFrame) -> list[str]:
    """Cells measured under both meters: the simulated peak beside the cpu meter's (real
    bitsandbytes for the peers), in bytes."""
    both = mem.pivot_table(
        index=["model", "row", "seq_len"], columns="meter", values="peak_bytes", aggfunc="first"
    )
    if not {"cpu", "simulated"} <= set(both.columns):
        return []
    both = both.dropna(subset=["cpu", "simulated"])
    lines = [
        "## The meters agree: simulated (NF4 stand-in) vs cpu (real bitsandbytes), bytes",
        "",
        "| Model | Row | T | simulated | cpu | equal |",
        "|---|---|---|---|---|---|",
    ]
    for (model, row, t), c in both.iterrows():
        same = "yes" if c.simulated == c.cpu else "no"
        lines.append(
            f"| {model} | {LABELS[row]} | {t} | {c.simulated:.0f} | {c.cpu:.0f} | {same} |"
        )
    return lines + [""]


def figure(mem: pd.DataFrame, speed: pd.DataFrame, path) -> None:
    sim = mem[(mem["meter"] == "simulated") & (mem["status"] == "ok") & (mem["model"] == MODEL)]
    panels = 3 if not speed.empty else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2))
    hue_order = [LABELS[r] for r in ORDER if r in set(sim["row"])]
    colors = dict(zip(LABELS.values(), sns.color_palette(), strict=False))
    colors["lowmem + LoRA (FP32)"] = "0.6"  # one colour per row in every panel
    sns.lineplot(
        sim,
        x="seq_len",
        y="peak_gib",
        hue="label",
        hue_order=hue_order,
        marker="o",
        ax=axes[0],
        palette=colors,
    )
    axes[0].set(
        xscale="log",
        yscale="log",
        xlabel="context (tokens)",
        ylabel="peak GiB",
        title=f"{sim['model'].iloc[0]}, simulated meter",
    )
    axes[0].set_xticks(list(paper.CONTEXTS), [str(t) for t in paper.CONTEXTS])
    peers = sim[sim["row"] != "best"]
    sns.lineplot(
        peers,
        x="seq_len",
        y="vs_best",
        hue="label",
        hue_order=hue_order[1:],
        marker="o",
        ax=axes[1],
        palette=colors,
    )
    axes[1].set(
        xscale="log",
        xlabel="context (tokens)",
        ylabel="peer peak / best peak",
        title="how many times best's memory",
    )
    axes[1].set_xticks(list(paper.CONTEXTS), [str(t) for t in paper.CONTEXTS])
    axes[1].set_ylim(bottom=0)
    if not speed.empty:
        order = [r for r in ["lora", *ORDER] if r in set(speed["row"])]
        hue = [speed.loc[speed["row"] == r, "label"].iloc[0] for r in order]
        sns.barplot(
            speed, x="seq_len", y="median_s", hue="label", hue_order=hue, ax=axes[2], palette=colors
        )
        axes[2].set(
            xlabel="context (tokens)",
            ylabel="median step s (one CPU thread)",
            title="SmolLM2-135M step time",
        )
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    with new_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def main() -> None:
    records = results.load_records(EXPERIMENT)
    mem, speed = memory_frame(records), speed_frame(records)
    out = results.results_dir()
    long = pd.concat([mem.assign(kind="peak_memory"), speed.assign(kind="step_time")])
    with new_file(out / "tables" / "peers.csv") as tmp:
        long.to_csv(tmp, index=False)
    with new_file(out / "tables" / "peers.md") as tmp:
        tmp.write_text(markdown(mem, speed))
    figure(mem, speed, out / "figures" / "peers.png")
    print(markdown(mem, speed))


if __name__ == "__main__":
    main()
