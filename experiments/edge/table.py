"""The tables of experiments/edge/README.md, from the records in results/raw/edge/ only.

python experiments/edge/table.py
"""

from __future__ import annotations

from lowmem import results

GiB, MiB = 2**30, 2**20
TARGETS = {1024: 1.0, 2048: 1.2}  # GiB, Llama-3.2 3B, whole process


def _g(x) -> str:
    return "-" if x is None else f"{x / GiB:.2f}"


def main() -> None:
    records = [r for r in results.load_records("edge") if r["phase"] in ("convert", "train")]
    print(
        "| model | phase | T | variant | sampled peak RSS GiB | time -v max RSS GiB "
        "| anon / file at peak GiB | wall s "
        "| baseline / setup / step / run peak GiB | setup s | tracked step peak MiB |"
    )
    print("|---" * 11 + "|")
    for r in sorted(
        records, key=lambda r: (r["model"], r["phase"], r["seq_len"] or 0, r["run_id"])
    ):
        m, s = r["metrics"], r.get("summary") or {}
        peak = m["sampled_peak"]
        variant = r["run_id"].rpartition("__")[2]
        p = s.get("process", {})
        figures = " / ".join(
            _g(p.get(k)) for k in ("baseline_rss_bytes", "setup_peak_rss_bytes",
                                   "step_peak_rss_bytes", "run_peak_rss_bytes")
        ) if p else "-"  # fmt: skip
        tracked = f"{s['peak_bytes'] / MiB:.0f}" if s.get("peak_bytes") else "-"
        setup = f"{p['setup_s']:.0f}" if p else "-"
        print(
            f"| {r['model']} | {r['phase']} | {r['seq_len'] or '-'} | {variant} "
            f"| {_g(peak['rss'])} | {m['max_rss_bytes'] / GiB:.2f} "
            f"| {_g(peak.get('anon'))} / {_g(peak.get('file'))} "
            f"| {m['wall_s']:.0f} | {figures} | {setup} | {tracked} |"
        )
    print()
    print(
        "| model | T | variant | steps | step s (median) | tokens/s | dequantize | recompute "
        "| offload I/O wait | disk read_bytes / step | rchar / step | offload store read / step |"
    )
    print("|---" * 12 + "|")
    for r in sorted(records, key=lambda r: (r["model"], r["seq_len"] or 0)):
        s = r.get("summary") or {}
        med = s.get("process_step_median")
        if r["phase"] != "train" or not med:
            continue
        print(
            f"| {r['model']} | {r['seq_len']} | {r['run_id'].rpartition('__')[2]} | {s['steps']} "
            f"| {s['step_s_median']:.0f} | {s['tokens_per_s_median']:.2f} "
            f"| {med['dequantize_share']:.0%} | {med['recompute_share']:.0%} "
            f"| {med['io_wait_share']:.1%} | {med['io_read_bytes'] / MiB:.0f} MiB "
            f"| {med['io_rchar'] / MiB:.0f} MiB | {med['offload_read_bytes'] / MiB:.0f} MiB |"
        )


if __name__ == "__main__":
    main()
