"""LoRA fine-tuning under any stack row: the loop, evaluation, and what a run writes.

`train(model, cfg, train_ds, eval_ds, out_dir)` runs `cfg.steps` optimizer steps on a model
built with `apply_stack` (`training_model` builds one and closes its offload files). Each step
(`lowmem.step`) is `grad_accum` micro-batches of forward + loss (`compute_loss` under the row:
the model's own loss, the softmax approximation, logits masking or the fused loss) + backward,
then clipping of the LoRA gradients' global norm, one AdamW step on the LoRA parameters only,
and one step of the LR schedule (linear warmup from 0, then cosine or linear decay to 0, or
constant). The meter sees the whole step; its peak, the loss, the LR and tokens/s go to the
progress bar and to `log.jsonl`, one line per step.

Evaluation runs in eval mode under no_grad, where `compute_loss` is the exact full-vocabulary
cross-entropy on every row (the softmax approximation trains only): a token-weighted mean over
the first `eval_batches` batches of the eval set, in order, before the first step, every
`eval_every` steps and after the last.

A run is reproducible and resumable: the data order is a function of (seed, epoch), and a
checkpoint holds the data position with the LoRA, optimizer, schedule and RNG states
(`lowmem.resume`, written atomically), so a killed run started again with resume=True gives the
losses and LoRA weights of an uninterrupted one, bit for bit.

Worked example: `python -m lowmem train --model smollm2-135m --task shakespeare --limit 4
--steps 6 --seq-len 128 --batch-size 4` on a shared 2-core CPU, cpu meter. `lora`: peak 1.29 GiB
per step, 13 s/step, eval loss 4.37 -> 4.16. `best`: peak 45 MiB, 37 s/step, eval loss 4.75 ->
4.54 (its INT4 base starts higher). In both, step 2 peaks 7.0 MiB above step 1: AdamW's
moments, 921,600 x 8 B, resident from then on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import get_scheduler

from lowmem.checkpoint import checkpointing_of
from lowmem.config import StackConfig, parse_spec
from lowmem.gptq import calibration_ids
from lowmem.loader import load_quantized, loads_by_tensor
from lowmem.meter import StepMeter
from lowmem.models import build_model
from lowmem.process import ProcessWatch, loading, offload_stats, process_summary, settle
from lowmem.resume import (
    append_log,
    load_checkpoint,
    open_run,
    read_log,
    restore,
    save_adapter,
    save_checkpoint,
    summarize,
    write_json,
)
from lowmem.settings import check_types, flat_fields, parse_value
from lowmem.stack import apply_stack
from lowmem.step import BatchOrder, accumulate, check_dataset, evaluate

SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
TRAIN_METERS = ("cpu", "cuda")


@dataclass(frozen=True)
class TrainConfig:
    """One training run; validated on construction, before any work is done."""

    stack: StackConfig = field(default_factory=StackConfig)
    """Stack row (a StackConfig, or a spec string such as "best:offload=memory")."""
    steps: int = 100
    """Optimizer steps."""
    batch_size: int = 4
    """Rows per micro-batch (B)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    warmup_steps: int = 0
    """Steps of linear warmup from 0 to lr."""
    schedule: str = "cosine"
    """After warmup: cosine or linear decay to 0, or constant."""
    max_grad_norm: float = 1.0
    """Clip the LoRA gradients' global norm to this; 0 = no clipping."""
    eval_every: int = 50
    """Evaluate every this many steps, before the first and after the last; 0 = never."""
    eval_batches: int = 8
    """Batches of the eval set evaluated each time; 0 = all of it."""
    checkpoint_every: int = 50
    """Write a checkpoint every this many steps and after the last; 0 = after the last only."""
    seed: int = 0
    """Seed of the data order and of the RNGs (dropout)."""
    meter_steps: int = 0
    """Steps the cpu meter tracks, from the first of a (resumed) run; 0 = every step. The
    tracker sees every op (it costs ~20% of a step, more with many small ops); from step 2 on
    a step repeats the same allocations (AdamW's moments exist), so 2 finds the run's peak."""

    def __post_init__(self) -> None:
        if isinstance(self.stack, str):
            object.__setattr__(self, "stack", parse_spec(self.stack))
        _require(
            isinstance(self.stack, StackConfig),
            "stack",
            self.stack,
            "a StackConfig or a spec string such as 'best:offload=memory'",
        )
        check_types(self)
        _require(
            self.stack.enabled("lora"),
            "stack",
            self.stack.stack,
            "a row from lora on, or best (training fits LoRA adapters)",
        )
        for name in ("steps", "batch_size", "grad_accum"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0, name, value, "an integer > 0")
        for name in (
            "warmup_steps",
            "eval_every",
            "eval_batches",
            "checkpoint_every",
            "seed",
            "meter_steps",
        ):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 0, name, value, "an integer >= 0")
        _require(self.warmup_steps <= self.steps, "warmup_steps", self.warmup_steps, "<= steps")
        _require(math.isfinite(self.lr) and self.lr > 0, "lr", self.lr, "a number > 0")
        _require(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        _require(self.max_grad_norm >= 0, "max_grad_norm", self.max_grad_norm, ">= 0 (0 = off)")
        schedules = ", ".join(SCHEDULES)
        _require(self.schedule in SCHEDULES, "schedule", self.schedule, f"one of {schedules}")

    def to_dict(self) -> dict:
        """Flat: the stack as its flat settings (`StackConfig.to_dict`)."""
        return {**asdict(self), "stack": self.stack.to_dict()}


def _require(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"bad {name}={value!r}: must be {allowed}")


def make_config(stack: str, sets: Sequence[str] = (), **fields) -> TrainConfig:
    """TrainConfig from a stack spec, FIELD=VALUE strings as `--set` gives them, and keyword
    fields; each goes to TrainConfig if it names one of its fields, else to the StackConfig."""
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"stack"}
    stack_fields = set(flat_fields(StackConfig))
    defaults = {k: fields.pop(k) for k in list(fields) if k not in train_fields}
    items = []
    for item in sets:
        key, sep, raw = item.partition("=")
        if sep and key in train_fields:
            fields[key] = parse_value(TrainConfig, key, raw)
        elif sep and key in stack_fields:
            items.append(item)
        else:
            raise ValueError(
                f"bad --set {item!r}: must be FIELD=VALUE with a field of TrainConfig "
                f"({', '.join(sorted(train_fields))}) or StackConfig ({', '.join(stack_fields)})"
            )
    name, _, options = stack.partition(":")
    spec = name + ":" + ",".join(filter(None, [options, *items]))
    defaults.setdefault("batch_size", fields.get("batch_size", TrainConfig.batch_size))
    defaults.setdefault("seed", fields.get("seed", TrainConfig.seed))
    return TrainConfig(stack=parse_spec(spec, **defaults), **fields)


def run_identity(cfg: TrainConfig, tags: dict | None) -> dict:
    """What run.json records and a resumed run must match: the config and the caller's tags."""
    return {"config": cfg.to_dict(), "tags": tags or {}}


@contextlib.contextmanager
def training_model(
    name: str,
    stack: StackConfig,
    init: str = "random",
    device: str | torch.device = "cpu",
    model_path: str | None = None,
    train_ds: Dataset | None = None,
) -> Iterator[torch.nn.Module]:
    """A registered model under a stack row (seeded by stack.seed); offload files go at exit.
    A directory under a row that quantizes with the lowmem backend loads a tensor at a time.
    The process's RSS before and while it loads goes with the model (`train` reports it).
    `train_ds`: the training split, whose first `quant_calib_tokens` tokens calibrate
    `quant_method="gptq"` (lowmem.gptq)."""
    torch.manual_seed(stack.seed)
    calibration = None
    if stack.enabled("quantize") and stack.quant.method == "gptq" and train_ds is not None:
        calibration = calibration_ids(train_ds, stack.quant.calib_tokens).to(device)
    with loading() as rss:
        if loads_by_tensor(stack, model_path):  # never the FP32 model (lowmem.loader)
            model = load_quantized(model_path, stack, device=device)
        else:
            model = build_model(name, init, device, model_path)
            model = apply_stack(model, stack, calibration=calibration)
        settle(model)  # streamed weights written: part of setup, not of the first step
    model.lowmem_process = rss
    try:
        yield model
    finally:
        ckpt = checkpointing_of(model)
        if ckpt is not None:
            ckpt.close()


def train(
    model: torch.nn.Module,
    cfg: TrainConfig,
    train_ds: Dataset,
    eval_ds: Dataset | None = None,
    out_dir: str | Path = "runs/train",
    resume: bool = False,
    meter: str = "cpu",
    tags: dict | None = None,
    progress: bool = True,
    callback: Callable[[dict], None] | None = None,
) -> dict:
    """Fine-tune the LoRA parameters of `model` (built with `apply_stack(model, cfg.stack)`).

    Writes `out_dir` (see lowmem.resume) and returns the summary also written there as
    summary.json. `resume`: continue the run in out_dir from its checkpoint (from step 0 if it
    has none yet). `tags` (model, task, ...) are recorded and must match on resume.
    `callback(entry)` sees each step's log entry after its checkpoint is written.
    """
    _check_inputs(model, cfg, train_ds, eval_ds, meter)
    out = Path(out_dir)
    created = not out.exists()
    state = open_run(out, run_identity(cfg, tags), resume)
    try:
        return _loop(model, cfg, train_ds, eval_ds, out, state, meter, progress, callback)
    except BaseException:
        # a run that fails before its first checkpoint has nothing to resume: leave no folder
        # that would refuse the corrected rerun
        if created and load_checkpoint(out) is None:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _loop(model, cfg: TrainConfig, train_ds, eval_ds, out: Path, state, meter, progress, callback):
    """The steps of `train`, from `state` (a checkpoint, or None) to the summary."""
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(SCHEDULES[cfg.schedule], optimizer, cfg.warmup_steps, cfg.steps)
    order = BatchOrder(train_ds, cfg.batch_size, cfg.seed)
    step = position = 0
    if state is None:
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
    else:
        restore(state, model, optimizer, scheduler)
        step, position = state["step"], state["position"]
    step_meter = StepMeter(meter, model, optimizer, cfg.meter_steps)
    watch = ProcessWatch(getattr(model, "lowmem_process", None))
    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", disable=not progress)
    model.train()
    with contextlib.closing(bar):
        if step == 0 and cfg.eval_every:
            _evaluate_and_log(model, cfg, eval_ds, out, 0)
        while step < cfg.steps:
            step += 1
            batches = [order.batch(position + i, device) for i in range(cfg.grad_accum)]
            position += cfg.grad_accum
            with watch.step(lambda: offload_stats(model)):
                entry = _step(model, cfg, batches, optimizer, scheduler, step_meter)
            entry = {"step": step, **entry, "process": watch.step_result()}
            append_log(out, entry)
            postfix = {"loss": f"{entry['loss']:.3f}", "tok/s": f"{entry['tokens_per_s']:.0f}"}
            if entry["peak_bytes"] is not None:
                postfix["peak"] = f"{entry['peak_bytes'] / 2**20:.0f}MiB"
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                postfix["eval"] = f"{_evaluate_and_log(model, cfg, eval_ds, out, step):.3f}"
            bar.set_postfix(postfix)
            bar.update()
            if step == cfg.steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                save_checkpoint(out, model, optimizer, scheduler, step, position)
            if callback is not None:
                callback(entry)
    save_adapter(model, out)
    entries = read_log(out)
    summary = summarize(entries, meter) | process_summary(entries, watch)
    summary |= {"trainable_parameters": sum(p.numel() for p in params), "out_dir": str(out)}
    summary["resumed_from_step"] = state["step"] if state else 0  # 0: one process ran it all
    summary["adapter"] = str(out / "adapter")
    write_json(out / "summary.json", summary)
    return summary


def _step(model, cfg: TrainConfig, batches, optimizer, scheduler, step_meter) -> dict:
    lr = scheduler.get_last_lr()[0]
    start = time.perf_counter()
    with step_meter.step(batches):
        loss, n = accumulate(model, cfg.stack, batches, step_meter.mark)
        step_meter.mark("optimizer")
        params = [p for g in optimizer.param_groups for p in g["params"]]
        norm = (
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm else None
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    seconds = time.perf_counter() - start
    tokens = sum(b["input_ids"].numel() for b in batches)
    return {
        "loss": loss,
        "lr": lr,
        "trainable_tokens": n,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "step_s": seconds,
        **step_meter.result(),
        "grad_norm": None if norm is None else float(norm),
    }


def _evaluate_and_log(model, cfg: TrainConfig, ds: Dataset, out: Path, step: int) -> float:
    loss = evaluate(model, cfg.stack, ds, cfg.batch_size, cfg.eval_batches)
    append_log(out, {"step": step, "eval_loss": loss})
    return loss


def _check_inputs(model, cfg: TrainConfig, train_ds, eval_ds, meter: str) -> None:
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"cfg must be a TrainConfig, not {type(cfg).__name__}")
    _require(meter in TRAIN_METERS, "meter", meter, "cpu or cuda (training needs real tensors)")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters: build it with apply_stack")
    vocab_size = model.config.vocab_size
    cfg.stack.check_model(vocab_size)
    for name, ds in (("train_ds", train_ds), ("eval_ds", eval_ds)):
        if ds is not None:
            check_dataset(ds, vocab_size, name)
    if len(train_ds) < cfg.batch_size:
        raise ValueError(
            f"train_ds has {len(train_ds)} rows: fewer than batch_size={cfg.batch_size}"
        )
    if cfg.eval_every and (eval_ds is None or len(eval_ds) == 0):
        raise ValueError(f"eval_every={cfg.eval_every} needs a non-empty eval_ds (or eval_every=0)")
