"""What each technique costs in model quality: the same fine-tuning run under every stack row.

The paper says its techniques cut memory "without sacrificing model quality" and publishes no
protocol. Ours: SmolLM2-135M-Instruct (real pretrained weights, `make assets`), LoRA r = 16 on
q, v, AdamW, 200 steps of 4 x 128 tokens, three seeds (LoRA initialisation, data order and
dropout; the held-out split stays fixed), the same data order, steps and learning rate for
every row; the only thing that changes is the stack row, i.e. how the base model is stored and
how the loss is computed:

    lora (FP32 reference) -> + INT4 -> + checkpointing/offload (exact: must equal + INT4)
    -> + softmax approximation, each rule at K = 100 and 1000 -> + logits masking (with the
    top-1000 approximation, as in the paper) -> best (exact loss)

and issue 15's quantization options, each on the INT4 row (NF4 codebook, GPTQ from 8192
training tokens, sequential; LoftQ-style adapter init, 8-bit embedding / LM head, searched
group scales, groups of 16 with FP16 scales), then
`best_chosen`: best with NF4 + GPTQ (8192 calibration tokens, sequential, act-order with static
groups, group scales searched with each column's error weighted by its input's energy, groups
of 16 with FP16 scales: the bytes of FP32 groups of 32) + the 8-bit table and no LoftQ step
(LoftQ re-rounds q / v to nearest, discarding their GPTQ codes), the option set the eval-only
scan ranked first (experiments/quant_options/before_scan.py, README there). The earlier
definitions stay rows so that their records still name one (`lowmem.quality_table` refuses a
record its row no longer defines), and are not run by default: `best_chosen_v1` (GPTQ from
512 tokens, FP32-fed, natural order, one LoftQ step), `best_chosen_v2` (session 10: no scale
search), `best_chosen_v3` (session 11: the unweighted scale search), `best_chosen_v4`
(session 12: FP32 scales in groups of 32), `gptq_v1` (GPTQ at the field defaults: 512 tokens,
FP32-fed; worse than round to nearest).

Two tasks: ShareGPT conversations, assistant tokens trainable (instruction tuning), and
Shakespeare blocks (domain adaptation; whole plays held out). Each run reports the held-out
exact loss before and after training (response tokens only for chat; evaluation never
approximates the softmax) and every `eval_every` steps, the final held-out loss, perplexity and
next-token accuracy through the `evaluate` metric modules of `lowmem.heldout`, the
peak of a whole training step (cpu meter, optimizer included) and the median step time. For
each row it also compares, after training, the gradient of the row's training loss with the
gradient of the exact loss on a fixed batch (cosine of the concatenated LoRA gradients): 1 for
the exact rows, below 1 where the softmax is approximated.

An adapter is deployed on the FP32 base, whatever row trained it: the saved adapter loaded with
stock peft onto `build_model(model, "pretrained")` (`fp32_base_model`). Each run therefore also
reports the held-out exact loss of the trained adapter there (`eval_loss_fp32_base`). For the
`lora` row that is the row's own model, so the two losses agree; from `int4` on they differ:
the adapter meets a base it was not trained on (and no longer the INT4 error it learned to undo).

Records: results/raw/quality/<task>__<row>__seed<k>.json, one per finished run, so `make
quality` resumes where it stopped. A run in progress lives in results/runs/quality/<run id>/
(`lowmem.resume`: checkpoint every CHECKPOINT_EVERY steps, not committed) and a killed run
continues from its last checkpoint, bit for bit the losses of an unbroken run (test); the
folder goes once the record is written, and one left by an older definition of the row (or
another protocol) is discarded with a warning. Table: results/tables/quality.{csv,md} (mean
and spread over the seeds). The first, 12-step, one-seed protocol's records and table are in
results/raw/quality_12steps/ and results/tables/quality_12steps.md (written at 3223175).
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import PeftModel
from tqdm.auto import tqdm

from lowmem import results
from lowmem.attention import set_gqa
from lowmem.data import chat_dataset, load_task
from lowmem.heldout import heldout_metrics
from lowmem.loss import compute_loss
from lowmem.models import build_model, load_tokenizer
from lowmem.readers import read_sharegpt
from lowmem.resume import check_run
from lowmem.step import COLUMNS, evaluate, to_batch
from lowmem.train import TrainConfig, make_config, run_identity, train, training_model

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
    # issue 15's options, each on the INT4 row, then best with the chosen ones
    "nf4": "quantize:quant_codebook=nf4",
    "gptq": "quantize:quant_method=gptq,quant_calib_tokens=8192,quant_gptq_sequential=true",
    "loftq": "quantize:quant_loftq_iters=5",
    "vocab8": "quantize:quant_vocab_bits=8",
    "best_chosen_v1": "best:quant_codebook=nf4,quant_method=gptq,quant_loftq_iters=1,"
    "quant_vocab_bits=8",
    "scale_search": "quantize:quant_scale_search=true",
    "g16_fp16": "quantize:quant_group_size=16,quant_scale_dtype=fp16",  # the bytes of g32 FP32
    "best_chosen_v2": "best:quant_codebook=nf4,quant_method=gptq,quant_vocab_bits=8,"
    "quant_calib_tokens=8192,quant_gptq_sequential=true,quant_gptq_act_order=true",
    "best_chosen_v3": "best:quant_codebook=nf4,quant_method=gptq,quant_vocab_bits=8,"
    "quant_calib_tokens=8192,quant_gptq_sequential=true,quant_gptq_act_order=true,"
    "quant_scale_search=true",
    "best_chosen_v4": "best:quant_codebook=nf4,quant_method=gptq,quant_vocab_bits=8,"
    "quant_calib_tokens=8192,quant_gptq_sequential=true,quant_gptq_act_order=true,"
    "quant_scale_search=true,quant_gptq_weighted_search=true",
    "gptq_v1": "quantize:quant_method=gptq",  # the field defaults: 512 tokens, FP32-fed
    "best_chosen": "best:quant_codebook=nf4,quant_method=gptq,quant_vocab_bits=8,"
    "quant_calib_tokens=8192,quant_gptq_sequential=true,quant_gptq_act_order=true,"
    "quant_scale_search=true,quant_gptq_weighted_search=true,quant_group_size=16,"
    "quant_scale_dtype=fp16",
}
REFERENCE = "lora"
FRESH = 1000  # ShareGPT conversations after the protocol's, for `fresh_heldout`
CHECKPOINT_EVERY = 10  # steps between checkpoints (SmolLM2: 921,600 LoRA values x 12 B = 11 MB)
# the order rows run in: the paper's rows and best first, the K / rule variants last
PRIORITY = ("lora", "int4", "best", "best_chosen", "nf4", "gptq", "loftq", "vocab8", "scale_search")
PRIORITY += ("g16_fp16",)
PRIORITY += ("checkpoint", "sm_topk_1000", "logits_mask")
PRIORITY += tuple(r for r in ROWS if r.startswith("sm_") and r != "sm_topk_1000")


@dataclass(frozen=True)
class Protocol:
    """What every run of the table shares."""

    model: str = "smollm2-135m"
    seq_len: int = 128
    batch_size: int = 4
    steps: int = 200
    lr: float = 1e-3
    eval_batches: int = 32
    eval_every: int = 50
    limit: int = 1000  # ShareGPT conversations kept
    plays: int = 0  # Shakespeare plays used, in file-name order (0 = all 38)
    split_seed: int = 0  # the train / held-out split, the same for every seed
    seeds: tuple[int, ...] = (0, 1, 2)


def fresh_heldout(tokenizer, protocol: Protocol, n: int = FRESH):
    """Rows of the `n` usable ShareGPT conversations after the protocol's first `limit` (which
    hold its train and held-out splits): text no run trained on and no option was chosen on
    (`best_chosen`'s were picked on the protocol's held-out split)."""
    conversations = read_sharegpt(limit=protocol.limit + n)[protocol.limit :]
    return chat_dataset(conversations, tokenizer, protocol.seq_len)


def row_config(row: str, protocol: Protocol, seed: int = 0) -> TrainConfig:
    """The run of `row` with training seed `seed` (LoRA initialisation, data order, dropout)."""
    if row not in ROWS:
        raise ValueError(f"unknown quality row {row!r}; choose from {', '.join(ROWS)}")
    return spec_config(ROWS[row], protocol, seed)


def spec_config(spec: str, protocol: Protocol, seed: int = 0) -> TrainConfig:
    """The run of a stack spec under the protocol, as `row_config` makes a row's (the eval-only
    scan of experiments/quant_options/before_scan.py configures its options with it)."""
    cfg = make_config(
        spec,
        steps=protocol.steps,
        batch_size=protocol.batch_size,
        lr=protocol.lr,
        eval_every=protocol.eval_every,
        eval_batches=protocol.eval_batches,
        checkpoint_every=protocol.steps,
        meter_steps=2,  # the peak repeats from step 2 on; tracking every op costs time
        seed=seed,
        seq_len=protocol.seq_len,
    )
    return dataclasses.replace(cfg, stack=cfg.stack.with_settings(seed=seed))


def run_id(task_name: str, row: str, seed: int) -> str:
    return f"{task_name}__{row}__seed{seed}"


def run_row(
    task,
    task_name: str,
    row: str,
    protocol: Protocol,
    seed: int = 0,
    progress: bool = True,
    fp32_base: torch.nn.Module | None = None,
    checkpoint_every: int = CHECKPOINT_EVERY,
    force: bool = False,
    fresh=None,
    experiment: str = EXPERIMENT,
) -> dict:
    """Train one row on `task` (a lowmem.data.Task) with training seed `seed` and write its
    record, continuing the run's checkpoint if a killed process left one (`force`: start
    over). `fp32_base`: the pretrained FP32 model, if the caller has built it already (it is
    copied, never changed). `fresh`: more held-out rows (`fresh_heldout`), all evaluated after
    training (`eval_loss_fresh`); `experiment`: where the record and the run folder go."""
    cfg = dataclasses.replace(row_config(row, protocol, seed), checkpoint_every=checkpoint_every)
    out = run_dir(task_name, row, seed, experiment)
    identity = {"model": protocol.model, "task": task_name, "row": row}
    identity["protocol"] = {k: v for k, v in asdict(protocol).items() if k != "seeds"}
    _discard_stale(out, cfg, identity, force)
    with training_model(protocol.model, cfg.stack, init="pretrained", train_ds=task.train) as model:
        summary = train(
            model, cfg, task.train, task.test, out, True, progress=progress, tags=identity
        )
        heldout = heldout_metrics(
            model,
            task.test,
            protocol.batch_size,
            protocol.eval_batches,
            cfg.stack.kernels.loss_chunk,
        )
        fixed = to_batch(
            task.train.select_columns(list(COLUMNS)).with_format("torch"),
            list(range(protocol.batch_size)),
            next(model.parameters()).device,
        )
        cosine = grad_cosine(model, cfg.stack, fixed)
        if fresh is not None:
            fresh_loss = evaluate(model, cfg.stack, fresh, protocol.batch_size)
    del model  # the row's model goes before the FP32 copy is made
    deployed = fp32_base_model(protocol.model, out / "adapter", fp32_base)
    fp32_loss = fp32_base_loss(deployed, task.test, protocol)
    (first, before), (_, after) = summary["eval_losses"][0], summary["eval_losses"][-1]
    assert first == 0, "the run must evaluate the untrained adapter first"
    record = {
        "run_id": run_id(task_name, row, seed),
        "status": "ok",
        "model": protocol.model,
        "task": {"name": task_name, "train_rows": len(task.train), "test_rows": len(task.test)},
        "row": row,
        "seed": seed,
        "protocol": asdict(protocol),
        "config": cfg.stack.to_dict(),
        "train_config": {k: v for k, v in cfg.to_dict().items() if k != "stack"},
        "meter": "cpu",
        "device": "cpu",
        "metrics": {
            "eval_loss_before": before,
            "eval_loss_train_loop": after,  # the training loop's own exact evaluation
            "eval_loss": heldout["loss"],  # through evaluate (lowmem.heldout), same tokens
            "perplexity": heldout["perplexity"],
            "accuracy": heldout["accuracy"],
            "eval_tokens": heldout["tokens"],
            "eval_curve": summary["eval_losses"],
            "eval_loss_fp32_base": fp32_loss,
            "train_losses": summary["losses"],
            "peak_bytes": summary["peak_bytes"],
            "step_s_median": summary["step_s_median"],
            "resumed_from_step": summary["resumed_from_step"],
            "grad_cosine": cosine,
        },
        "environment": results.environment(),
    }
    if fresh is not None:
        record["metrics"] |= {"eval_loss_fresh": fresh_loss, "fresh_rows": len(fresh)}
    results.write_record(experiment, record)
    shutil.rmtree(out)  # the record holds what the run found; its folder has served
    return record


def run_dir(task_name: str, row: str, seed: int, experiment: str = EXPERIMENT) -> Path:
    """Where a run in progress keeps its checkpoint (`lowmem.resume`), until its record."""
    return results.results_dir() / "runs" / experiment / run_id(task_name, row, seed)


def _discard_stale(out: Path, cfg: TrainConfig, identity: dict, force: bool) -> None:
    """Remove a run folder that cannot be continued: with `force`, or when it holds a run of
    another definition of the row or another protocol (a warning names the difference)."""
    if not out.exists():
        return
    if not force:
        try:
            check_run(out, run_identity(cfg, identity), resume=True)
            return
        except ValueError as e:
            warnings.warn(
                f"discarding an unfinished run that cannot be continued: {e}", stacklevel=3
            )
    shutil.rmtree(out)


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
    stack = row_config(REFERENCE, protocol).stack  # only its attention path is read
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
    """Every (row, seed, task) not recorded yet (all with force), rows in the given order and
    each row's seeds and tasks together, so a stopped run leaves whole rows. The table:
    `lowmem.quality_table.write_table`."""
    todo = [
        (row, seed, task_name)
        for row in rows
        for seed in protocol.seeds
        for task_name in tasks
        if force or not results.record_path(EXPERIMENT, run_id(task_name, row, seed)).exists()
    ]
    written, loaded, fp32_base = [], {}, None
    tokenizer = load_tokenizer(protocol.model) if todo else None
    for row, seed, task_name in tqdm(todo, desc="quality", unit="run"):
        if task_name not in loaded:
            limit = protocol.limit if task_name == "sharegpt" else protocol.plays or None
            loaded[task_name] = load_task(
                task_name, tokenizer, protocol.seq_len, limit=limit, seed=protocol.split_seed
            )
        # built once (SmolLM2's GGUF takes ~15 s to dequantize), copied for each run
        if fp32_base is None:
            fp32_base = build_model(protocol.model, "pretrained").eval()
        task = loaded[task_name]  # each run shows its own step bar: 15-30 min apiece
        written.append(run_row(task, task_name, row, protocol, seed, True, fp32_base, force=force))
    return written
