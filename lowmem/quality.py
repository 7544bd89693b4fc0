"""What each technique costs in model quality: the same fine-tuning run under every stack row.

The paper says its techniques cut memory "without sacrificing model quality" and publishes no
protocol. Ours: SmolLM2-135M-Instruct (real pretrained weights, `make assets`), LoRA r = 16 on
q, v, AdamW, the same data order, seed, steps and learning rate for every row; the only thing
that changes is the stack row, i.e. how the base model is stored and how the loss is computed:

    lora (FP32 reference) -> + INT4 -> + checkpointing/offload (exact: must equal + INT4)
    -> + softmax approximation, each rule at K = 100 and 1000 -> + logits masking (with the
    top-1000 approximation, as in the paper) -> best (exact loss)

Two tasks: ShareGPT conversations, assistant tokens trainable (instruction tuning), and
Shakespeare blocks (domain adaptation). Each run reports the held-out exact loss before and
after training (response tokens only for chat; evaluation never approximates the softmax), the
peak of a whole training step (cpu meter, optimizer included) and the median step time. For
each row it also compares, after training, the gradient of the row's training loss with the
gradient of the exact loss on a fixed batch (cosine of the concatenated LoRA gradients): 1 for
the exact rows, below 1 where the softmax is approximated.

An adapter is deployed on the FP32 base, whatever row trained it: the saved adapter loaded with
stock peft onto `build_model(model, "pretrained")` (`fp32_base_model`). Each run therefore also
reports the held-out exact loss of the trained adapter there (`eval_loss_fp32_base`). For the
`lora` row that is the row's own model, so the two losses agree; from `int4` on they differ:
the adapter meets a base it was not trained on (and no longer the INT4 error it learned to undo).

Records: results/raw/quality/<task>__<row>.json; table: results/tables/quality.{csv,md}.
"""

from __future__ import annotations

import copy
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from peft import PeftModel
from tqdm.auto import tqdm

from lowmem import results
from lowmem.attention import set_gqa
from lowmem.data import load_task
from lowmem.loss import compute_loss
from lowmem.models import build_model, load_tokenizer
from lowmem.step import COLUMNS, evaluate, to_batch
from lowmem.train import TrainConfig, make_config, train, training_model

EXPERIMENT = "quality"
TASKS = ("sharegpt", "shakespeare")
ROWS = {  # row -> stack spec; cumulative like Table 1
    "lora": "lora",
    "int4": "quantize",
    "checkpoint": "checkpoint",
    "sm_topk_100": "softmax_approx:softmax_k=100",
    "sm_topk_1000": "softmax_approx:softmax_k=1000",
    "sm_neighbors_100": "softmax_approx:softmax_rule=target_neighbors,softmax_k=100",
    "sm_neighbors_1000": "softmax_approx:softmax_rule=target_neighbors,softmax_k=1000",
    "logits_mask": "logits_mask",
    "best": "best",
}
REFERENCE = "lora"
# the order rows run in: the paper's rows and best first, the K / rule variants last
PRIORITY = ("lora", "int4", "checkpoint", "sm_topk_1000", "logits_mask", "best") + tuple(
    r for r in ROWS if r.startswith("sm_") and r != "sm_topk_1000"
)


@dataclass(frozen=True)
class Protocol:
    """What every row of the table shares."""

    model: str = "smollm2-135m"
    seq_len: int = 128
    batch_size: int = 4
    steps: int = 12
    lr: float = 2e-3
    eval_batches: int = 8
    limit: int = 400  # ShareGPT conversations kept
    plays: int = 0  # Shakespeare plays used, in file-name order (0 = all 38)
    seed: int = 0


def row_config(row: str, protocol: Protocol) -> TrainConfig:
    if row not in ROWS:
        raise ValueError(f"unknown quality row {row!r}; choose from {', '.join(ROWS)}")
    return make_config(
        ROWS[row],
        steps=protocol.steps,
        batch_size=protocol.batch_size,
        lr=protocol.lr,
        eval_every=protocol.steps,
        eval_batches=protocol.eval_batches,
        checkpoint_every=protocol.steps,
        meter_steps=2,  # the peak repeats from step 2 on; tracking every op costs time
        seed=protocol.seed,
        seq_len=protocol.seq_len,
    )


def run_row(
    task,
    task_name: str,
    row: str,
    protocol: Protocol,
    progress: bool = True,
    fp32_base: torch.nn.Module | None = None,
) -> dict:
    """Train one row on `task` (a lowmem.data.Task) and write its record. `fp32_base`: the
    pretrained FP32 model, if the caller has built it already (it is copied, never changed)."""
    cfg = row_config(row, protocol)
    with tempfile.TemporaryDirectory(prefix="lowmem-quality-") as out:
        with training_model(protocol.model, cfg.stack, init="pretrained") as model:
            summary = train(model, cfg, task.train, task.test, out, progress=progress)
            fixed = to_batch(
                task.train.select_columns(list(COLUMNS)).with_format("torch"),
                list(range(protocol.batch_size)),
                next(model.parameters()).device,
            )
            cosine = grad_cosine(model, cfg.stack, fixed)
        del model  # the row's model goes before the FP32 copy is made
        deployed = fp32_base_model(protocol.model, Path(out) / "adapter", fp32_base)
        fp32_loss = fp32_base_loss(deployed, task.test, protocol)
    (first, before), (_, after) = summary["eval_losses"][0], summary["eval_losses"][-1]
    assert first == 0, "the run must evaluate the untrained adapter first"
    record = {
        "run_id": f"{task_name}__{row}",
        "status": "ok",
        "model": protocol.model,
        "task": {"name": task_name, "train_rows": len(task.train), "test_rows": len(task.test)},
        "protocol": asdict(protocol),
        "config": cfg.stack.to_dict(),
        "train_config": {k: v for k, v in cfg.to_dict().items() if k != "stack"},
        "meter": "cpu",
        "device": "cpu",
        "metrics": {
            "eval_loss_before": before,
            "eval_loss": after,
            "perplexity": math.exp(after),
            "eval_loss_fp32_base": fp32_loss,
            "train_losses": summary["losses"],
            "peak_bytes": summary["peak_bytes"],
            "step_s_median": summary["step_s_median"],
            "grad_cosine": cosine,
        },
        "environment": results.environment(),
    }
    results.write_record(EXPERIMENT, record)
    return record


def fp32_base_model(
    model: str,
    adapter_dir: str | Path,
    fp32_base: torch.nn.Module | None = None,
    model_path: str | None = None,
) -> PeftModel:
    """How an adapter is deployed: the saved adapter, loaded with stock peft onto the plain FP32
    pretrained model (`fp32_base`, copied, or built here), in eval mode."""
    if fp32_base is None:
        base = build_model(model, "pretrained", model_path=model_path)
    else:
        base = copy.deepcopy(fp32_base)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def fp32_base_loss(deployed: torch.nn.Module, ds, protocol: Protocol) -> float:
    """Held-out exact loss of a deployed model, evaluated as every row is (on the `lora` row's
    attention path: it is that row's model; the deployed model is switched to it)."""
    stack = row_config(REFERENCE, protocol).stack
    resolved = stack.resolved()
    set_gqa(deployed, resolved.kernels.gqa, resolved.kernels.attention_block)
    return evaluate(deployed, stack, ds, protocol.batch_size, protocol.eval_batches)


def grad_cosine(model: torch.nn.Module, stack, batch: dict) -> float:
    """Cosine of the LoRA gradients of the row's training loss and of the exact loss."""

    def grads(training: bool) -> torch.Tensor:
        model.train(training)
        params = [p for p in model.parameters() if p.requires_grad]
        loss = compute_loss(model, batch, stack)[0]
        return torch.cat([g.flatten().double() for g in torch.autograd.grad(loss, params)])

    row, exact = grads(True), grads(False)  # eval mode = the exact full-vocabulary loss
    model.train()
    return float(torch.nn.functional.cosine_similarity(row, exact, dim=0))


def run(
    tasks=TASKS, rows=PRIORITY, protocol: Protocol = Protocol(), force: bool = False
) -> list[dict]:
    """Every (task, row) not recorded yet (all with force); then the table."""
    tokenizer = load_tokenizer(protocol.model)
    written, fp32_base = [], None
    for task_name in tasks:
        todo = [r for r in rows if force or not _recorded(task_name, r)]
        if not todo:
            continue
        limit = protocol.limit if task_name == "sharegpt" else protocol.plays or None
        task = load_task(task_name, tokenizer, protocol.seq_len, limit=limit, seed=protocol.seed)
        # built once (SmolLM2's GGUF takes ~15 s to dequantize), copied for each row
        if fp32_base is None:
            fp32_base = build_model(protocol.model, "pretrained").eval()
        for row in tqdm(todo, desc=f"quality {task_name}", unit="row"):
            written.append(run_row(task, task_name, row, protocol, False, fp32_base))
    write_table()
    return written


def _recorded(task_name: str, row: str) -> bool:
    return results.record_path(EXPERIMENT, f"{task_name}__{row}").exists()


def quality_frame(records: list[dict]) -> pd.DataFrame:
    """One row per (task, row), with the differences to the task's reference row."""
    frame = pd.DataFrame(
        {
            "task": r["task"]["name"],
            "row": r["run_id"].split("__", 1)[1],
            **{k: r["metrics"][k] for k in ("eval_loss_before", "eval_loss", "perplexity")},
            # records written before the FP32-base evaluation existed have none
            "eval_loss_fp32_base": r["metrics"].get("eval_loss_fp32_base", math.nan),
            "peak_mib": r["metrics"]["peak_bytes"] / 2**20,
            "step_s": r["metrics"]["step_s_median"],
            "grad_cosine": r["metrics"]["grad_cosine"],
        }
        for r in records
        if r["status"] == "ok"
    )
    ref = frame[frame["row"] == REFERENCE].set_index("task")
    frame["loss_vs_ref"] = frame["eval_loss"] - frame["task"].map(ref["eval_loss"])
    frame["fp32_base_vs_ref"] = frame["eval_loss_fp32_base"] - frame["task"].map(ref["eval_loss"])
    frame["time_vs_ref"] = frame["step_s"] / frame["task"].map(ref["step_s"])
    frame["order"] = frame["row"].map(list(ROWS).index)
    return frame.sort_values(["task", "order"]).drop(columns="order")


def write_table() -> tuple[Path, Path]:
    records = results.load_records(EXPERIMENT)
    if not records:
        raise ValueError(f"no records under {results.results_dir() / 'raw' / EXPERIMENT}")
    frame = quality_frame(records)
    out = results.results_dir() / "tables"
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "quality.csv", index=False, float_format="%.5f")
    p = Protocol(**records[0]["protocol"])
    lines = [
        "# quality: held-out exact loss after LoRA fine-tuning under each stack row\n",
        f"{p.model}, {p.steps} steps of {p.batch_size} x {p.seq_len} tokens, AdamW lr {p.lr}, "
        f"seed {p.seed}; eval on {p.eval_batches} held-out batches (chat: assistant tokens "
        "only). Eval loss: the row's own model (its base as the row stores it) + the adapter; "
        "on FP32 base: the same adapter loaded with peft onto the FP32 pretrained model, as it "
        "is deployed (vs lora: difference to the `lora` row's eval loss). Peak: one whole "
        "training step, cpu meter. Step time: median, relative to `lora`. Generated by "
        "`python -m lowmem quality` from results/raw/quality/.\n",
        "| task | row | stack | eval loss before -> after | perplexity | vs lora "
        "| on FP32 base (vs lora) | peak MiB | step time | grad cosine |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _, c in frame.iterrows():
        fp32 = (
            f"{c['eval_loss_fp32_base']:.4f} ({c['fp32_base_vs_ref']:+.4f})"
            if math.isfinite(c["eval_loss_fp32_base"])
            else "n/a"
        )
        lines.append(
            f"| {c['task']} | {c['row']} | `{ROWS[c['row']]}` | {c['eval_loss_before']:.4f} -> "
            f"{c['eval_loss']:.4f} | {c['perplexity']:.2f} | {c['loss_vs_ref']:+.4f} | {fp32} | "
            f"{c['peak_mib']:.0f} | {c['time_vs_ref']:.2f}x | {c['grad_cosine']:.4f} |"
        )
    (out / "quality.md").write_text("\n".join(lines) + "\n")
    return out / "quality.csv", out / "quality.md"
