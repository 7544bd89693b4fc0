"""Issue 15's target on ShareGPT text that no run trained on and no option was chosen on.

    python experiments/quality/fresh_check.py --rows lora best_chosen [--seed 0]   # ~45 min a row
    python experiments/quality/fresh_check.py --table

`best_chosen`'s options were picked by their loss before training on the protocol's held-out
split, the split `results/tables/quality.md` reports, so its gap there may be biased low. Each
run here is the quality protocol's run of the row (`lowmem.quality.run_row`: same configuration,
data order and seed), so it must end with the protocol's held-out loss of the row's record in
`results/raw/quality/` (the table shows both). After training the adapter is also evaluated,
exact softmax, on all of `lowmem.quality.fresh_heldout`: the 1000 usable ShareGPT conversations
after the protocol's 1000. Records: results/raw/quality_fresh/sharegpt__<row>__seed<k>.json
(a killed run resumes from results/runs/quality_fresh/).
"""

from __future__ import annotations

import argparse
import json

from lowmem import results
from lowmem.data import load_task
from lowmem.models import load_tokenizer
from lowmem.quality import EXPERIMENT as PROTOCOL_RUNS
from lowmem.quality import REFERENCE, ROWS, Protocol, fresh_heldout, run_id, run_row

EXPERIMENT = "quality_fresh"
TASK = "sharegpt"


def table(seed: int) -> str:
    """Markdown: per row, the protocol's held-out loss (this run's and the protocol record's)
    and the fresh set's, and the gaps to the reference row."""

    def metrics(experiment: str, row: str) -> dict | None:
        path = results.record_path(experiment, run_id(TASK, row, seed))
        return json.loads(path.read_text())["metrics"] if path.exists() else None

    ref = metrics(EXPERIMENT, REFERENCE)
    lines = [
        f"| row (seed {seed}) | protocol held-out: this run / its record | gap | fresh | gap |",
        "|---|---|---|---|---|",
    ]
    for row in ROWS:
        got = metrics(EXPERIMENT, row)
        if got is None:
            continue
        record = metrics(PROTOCOL_RUNS, row)
        theirs = f"{record['eval_loss']:.4f}" if record else "-"

        def gap(key: str, got=got) -> str:
            return f"{got[key] - ref[key]:+.4f}" if ref else "-"

        cells = [f"{got['eval_loss']:.4f} / {theirs}", gap("eval_loss")]
        cells += [f"{got['eval_loss_fresh']:.4f}", gap("eval_loss_fresh")]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", nargs="+", default=[REFERENCE, "best_chosen"], choices=ROWS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="run rows that have a record")
    parser.add_argument("--table", action="store_true", help="print the table and stop")
    args = parser.parse_args()
    if not args.table:
        protocol = Protocol()
        tokenizer = load_tokenizer(protocol.model)
        task = load_task(
            TASK, tokenizer, protocol.seq_len, protocol.limit, seed=protocol.split_seed
        )
        fresh = fresh_heldout(tokenizer, protocol)
        for row in args.rows:
            if results.record_path(EXPERIMENT, run_id(TASK, row, args.seed)).exists():
                if not args.force:
                    continue
            run_row(
                task,
                TASK,
                row,
                protocol,
                args.seed,
                force=args.force,
                fresh=fresh,
                experiment=EXPERIMENT,
            )
    print(table(args.seed))


if __name__ == "__main__":
    main()
