"""Which configuration fits a memory budget for the whole process, and which of those is fastest.

`plan_budget(model, "2GiB", seq_len=4096)` answers before anything is loaded. It walks the
knobs of the `best` profile (`KNOBS`: offload to disk or memory, weight streaming, cache
policy, MLP tile, loss chunk, dequantization chunk, and the micro-batch of the requested batch
with gradient accumulation for the rest), each a ladder from its most frugal value to its
fastest. A candidate's whole-process peak is

    process baseline (interpreter + torch + transformers, measured once in a subprocess; a
      `train` run also holds its tokenizer and tokenized data: +0.14 GiB after the trim on
      Llama-3.2 3B with Shakespeare, experiments/edge, not in this term)
    + the larger of
      - setup: loading the model. From a converted directory (`python -m lowmem convert`, read
        by `lowmem.loader`): the largest packed tensor (its shard's pages resident until the
        weights reach the offload store) + four row blocks, + every quantized weight when they
        are not streamed (they stay resident); a registered model built in memory: its FP32
        weights + their quantized copy + two FP32 temporaries of the largest tensor while it
        is quantized (what `measure` / `train` without --model-path do). Llama-3.2 3B from a
        converted directory, best: predicted 0.29 GiB, measured 0.31 GiB above the baseline
        (experiments/edge)
      - the step's peak (the simulated meter, one record per configuration, cached under
        results/raw/planner/ like any other record) + AdamW's two FP32 moments of the
        trainable parameters (they outlive the step),

and its step time comes from `TimeModel`: FLOPs of the step (6 x parameters x tokens plus
attention) at a rate fitted from the committed `lora` speed record, times the measured cost of
the knobs that change the work (checkpoint recompute, disk, streaming; the `*_speed` records).

Search: start from the most frugal candidate (every knob at the bottom of its ladder). If it
does not fit, nothing does: the plan reports that smallest peak and what dominates it. Else
climb greedily: among the candidates one rung up on one knob, take the fastest (predicted)
that fits; stop when no step up fits. Every evaluated candidate is kept in the plan's table.
The greedy climb evaluates a few dozen configurations at most, not the whole product; it can
miss a faster combination that needs two knobs raised at once (ladders are ordered so that
each rung costs memory and buys time).
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from lowmem import results
from lowmem.config import StackConfig, describe
from lowmem.loader import BLOCK_BYTES
from lowmem.models import REGISTRY, get_spec, load_config, registered_mlp_width
from lowmem.profile_file import write_profile
from lowmem.timemodel import TimeModel

KNOBS: dict[str, tuple] = {  # each ladder: most frugal first, fastest last
    "offload": ("disk", "memory"),
    "stream_weights": (True, False),
    "cache_policy": ("none", "attention"),
    "mlp_tile": (128, 256, 1024),
    "loss_chunk": (1024, 4096),
    "dequant_chunk": (256, -1),
}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20}
_UNITS |= {"gib": 2**30, "tb": 10**12, "tib": 2**40}


def parse_bytes(text: str | int) -> int:
    """ "2GiB", "1.5 GB", "512MiB" or a plain byte count -> bytes."""
    if isinstance(text, int) and not isinstance(text, bool) and text > 0:
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match and match.group(2).lower()
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(
            f"bad budget={text!r}: must be a positive size such as 2GiB, 1.5GB, 512MiB or bytes"
        )
    return int(float(match.group(1)) * _UNITS[unit])


@dataclasses.dataclass
class Candidate:
    """One evaluated configuration of the plan."""

    cfg: StackConfig
    grad_accum: int
    setup_peak: int
    step_peak: int
    optimizer_bytes: int
    baseline: int
    step_s: float
    peak_tensor: str

    @property
    def whole_peak(self) -> int:
        return self.baseline + max(self.setup_peak, self.step_peak + self.optimizer_bytes)

    def row(self) -> dict:
        return {
            "settings": describe(self.cfg).partition(":")[2] or "(best defaults)",
            "micro_batch": self.cfg.batch_size,
            "grad_accum": self.grad_accum,
            "setup_peak_gib": self.setup_peak / 2**30,
            "step_peak_gib": self.step_peak / 2**30,
            "whole_peak_gib": self.whole_peak / 2**30,
            "predicted_step_s": self.step_s,
        }


@dataclasses.dataclass
class BudgetPlan:
    """The answer: every evaluated candidate, those that fit, and the chosen one (or None)."""

    model: str
    budget: int
    seq_len: int
    batch_size: int
    candidates: list[Candidate]

    @property
    def fitting(self) -> list[Candidate]:
        """Those that fit, fastest predicted first; among equal predictions the one that uses
        more of the budget, then the coarser (bigger tiles and chunks: fewer passes, which the
        time model does not price)."""
        fits = [c for c in self.candidates if c.whole_peak <= self.budget]
        return sorted(fits, key=lambda c: (c.step_s, -c.whole_peak, -coarseness(c.cfg)))

    @property
    def chosen(self) -> Candidate | None:
        return self.fitting[0] if self.fitting else None

    @property
    def smallest(self) -> Candidate:
        return min(self.candidates, key=lambda c: c.whole_peak)

    def table(self) -> str:
        """The candidates that fit, fastest first, as a Markdown table; or why none does."""
        if not self.fitting:
            s = self.smallest
            return (
                f"nothing fits {self.budget / 2**30:.2f} GiB: the smallest whole-process peak "
                f"is {s.whole_peak / 2**30:.3f} GiB ({describe(s.cfg)}), of which the step "
                f"{s.step_peak / 2**30:.3f} GiB (at its peak: {s.peak_tensor}), AdamW's "
                f"moments {s.optimizer_bytes / 2**30:.3f} GiB, loading the model "
                f"{s.setup_peak / 2**30:.3f} GiB, and the process baseline "
                f"{s.baseline / 2**30:.3f} GiB"
            )
        rows = [c.row() for c in self.fitting]
        head = "| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]) + "\n"
        body = "".join(
            "| "
            + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values())
            + " |\n"
            for r in rows
        )
        return head + body

    def write_profile(self, path: str | Path) -> Path:
        """The chosen configuration as a profile file that `train --stack FILE` and
        `lowmem.prepare(model, FILE)` take."""
        if self.chosen is None:
            raise ValueError(f"no profile to write: {self.table()}")
        c = self.chosen
        planned_for = {
            "model": self.model,
            "budget_bytes": self.budget,
            "seq_len": self.seq_len,
            "predicted_whole_peak_bytes": c.whole_peak,
            "predicted_step_peak_bytes": c.step_peak,
            "predicted_step_s": c.step_s,
        }
        return write_profile(path, c.cfg, c.grad_accum, planned_for)


def plan_budget(
    model: str,
    budget: str | int,
    seq_len: int,
    batch_size: int = 1,
    baseline: int | None = None,
    from_directory: bool | None = None,
    experiment: str = "planner",
) -> BudgetPlan:
    """The plan for `model` (a registered name, or a Hugging Face directory of a registered
    architecture) at `seq_len` tokens and `batch_size` sequences per optimizer step.
    `from_directory`: the run loads a directory a tensor at a time (default: when `model` is
    one); else a registered model is built in memory. `baseline`: the process's RSS before the
    model (default: measured, `process_baseline`)."""
    limit = parse_bytes(budget)
    evaluate, ladders = _evaluator(model, seq_len, batch_size, baseline, from_directory, experiment)
    rung = dict.fromkeys(ladders, 0)
    current = evaluate(_config(rung, ladders, seq_len))
    while current.whole_peak <= limit:
        ups = [{**rung, k: i + 1} for k, i in rung.items() if i + 1 < len(ladders[k])]
        # fastest predicted first; among equals the larger rung (bigger tiles, fewer passes)
        ups.sort(key=lambda r: (evaluate.step_s(_config(r, ladders, seq_len)), -sum(r.values())))
        up = next(
            (r for r in ups if evaluate(_config(r, ladders, seq_len)).whole_peak <= limit), None
        )
        if up is None:
            break
        rung, current = up, evaluate(_config(up, ladders, seq_len))
    return BudgetPlan(evaluate.model, limit, seq_len, batch_size, list(evaluate.seen.values()))


def smallest(
    model: str,
    seq_len: int,
    batch_size: int = 1,
    baseline: int | None = None,
    from_directory: bool | None = None,
    experiment: str = "planner",
) -> Candidate:
    """The most frugal candidate (every knob at its lowest rung): the least whole-process
    memory this model can train `seq_len` tokens in, whatever the budget."""
    evaluate, ladders = _evaluator(model, seq_len, batch_size, baseline, from_directory, experiment)
    return evaluate(_config(dict.fromkeys(ladders, 0), ladders, seq_len))


def _evaluator(model, seq_len, batch_size, baseline, from_directory, experiment):
    name = _registered(model)
    for label, value in (("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"bad {label}={value!r}: must be an integer >= 1")
    from_dir = model not in REGISTRY if from_directory is None else from_directory
    base = process_baseline() if baseline is None else baseline
    evaluate = _Evaluator(name, seq_len, batch_size, base, TimeModel.fit(), experiment, from_dir)
    micro = tuple(b for b in range(1, batch_size + 1) if batch_size % b == 0)
    return evaluate, {**KNOBS, "batch_size": micro}


def coarseness(cfg: StackConfig) -> int:
    """How far up its ladders a configuration sits: the sum of its knobs' rungs (0 = the most
    frugal setting of every knob)."""
    values = cfg.to_dict()
    return sum(ladder.index(values[k]) for k, ladder in KNOBS.items() if values[k] in ladder)


def _config(rung: dict, ladders: dict, seq_len: int) -> StackConfig:
    values = {k: ladders[k][i] for k, i in rung.items()}
    return StackConfig.from_flat("best", seq_len=seq_len, **values)


class _Evaluator:
    """Candidate of a configuration: its step peak from a simulated record (measured once,
    then read), its whole-process peak and predicted time."""

    def __init__(self, model, seq_len, batch_size, baseline, timer, experiment, from_dir):
        self.model, self.seq_len, self.batch_size = model, seq_len, batch_size
        self.baseline, self.timer, self.experiment = baseline, timer, experiment
        self.from_dir = from_dir
        self.seen: dict[StackConfig, Candidate] = {}

    def step_s(self, cfg: StackConfig) -> float:
        """Seconds of one optimizer step: grad_accum micro-steps."""
        return self.timer.predict(self.model, cfg) * (self.batch_size // cfg.batch_size)

    def __call__(self, cfg: StackConfig) -> Candidate:
        if cfg not in self.seen:
            m = step_record(self.model, cfg, self.experiment)["metrics"]
            setup = setup_peak(self.model, cfg, m, self.from_dir)
            top = (m.get("peak_tensors") or [{}])[0]
            where = f"{m.get('peak_phase')} {m.get('peak_op')}, largest {top.get('shape')}"
            self.seen[cfg] = Candidate(
                cfg,
                self.batch_size // cfg.batch_size,
                setup,
                m["peak_bytes"],
                8 * m["trainable_parameters"],
                self.baseline,
                self.step_s(cfg),
                where,
            )
        return self.seen[cfg]


def setup_peak(model: str, cfg: StackConfig, metrics: dict, from_dir: bool) -> int:
    """Bytes held while `model` is loaded under `cfg` (the module docstring's setup term),
    from the configuration's simulated `metrics` (`step_record`)."""
    c = load_config(model)
    if from_dir:  # a converted directory, a tensor at a time (lowmem.loader)
        q = cfg.quant
        packed = c.vocab_size * c.hidden_size * (q.bits / 8 + 4 / (q.group_size or c.hidden_size))
        setup = int(packed) + 4 * BLOCK_BYTES
        return setup + (0 if cfg.checkpoint.stream_weights else metrics["stored_weight_bytes"])
    # built in FP32, then quantized; quantizing the largest tensor (the embedding) whole holds
    # two FP32 temporaries of it (w / scale, its rounding)
    setup = 4 * metrics["parameters"] + metrics["stored_weight_bytes"]
    return setup + 2 * 4 * c.vocab_size * c.hidden_size


def step_record(model: str, cfg: StackConfig, experiment: str = "planner") -> dict:
    """The simulated record of one configuration: read if it exists and ran what `cfg` runs
    now, else measured and written (over a record whose resolved settings differ: one
    measured before a setting existed or before an `auto` resolved as it does now)."""
    from lowmem.bench import run_cell  # here: bench builds models

    path = results.record_path(experiment, results.run_id(model, cfg, "simulated"))
    if path.exists():
        record = json.loads(path.read_text())
        ran = cfg.resolved(mlp_width=registered_mlp_width(model)).to_dict()
        ran = json.loads(json.dumps(ran))  # tuples as the record has them
        if record.get("resolved_config") == ran:
            return record
    what = f"{model} {describe(cfg)} at {cfg.seq_len} tokens"
    print(f"planner: simulating {what} (not in results/raw/{experiment}/)", file=sys.stderr)
    start = time.perf_counter()
    record = run_cell(model, cfg, "simulated")
    if record["status"] == "failed":
        raise RuntimeError(f"simulating {describe(cfg)} on {model} failed: {record['error']}")
    results.write_record(experiment, record)
    took = time.perf_counter() - start
    peak = record["metrics"]["peak_bytes"] / 2**30
    print(f"planner: {what}: step peak {peak:.3f} GiB ({took:.0f} s)", file=sys.stderr)
    return record


def _registered(model: str) -> str:
    """A registered model name, or the registered name of a directory's architecture."""
    if model in REGISTRY:
        return model
    path = Path(model)
    if not (path / "config.json").is_file():
        get_spec(model)  # the one-line "unknown model ..." error
    from lowmem.models import read_config

    config = read_config(path).to_dict()
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers")
    keys += ("num_attention_heads", "num_key_value_heads", "vocab_size", "tie_word_embeddings")
    for name in REGISTRY:
        known = load_config(name).to_dict()
        if all(known.get(k) == config.get(k) for k in keys):
            return name
    raise ValueError(
        f"bad model={model!r}: its architecture matches no registered model "
        f"({', '.join(REGISTRY)}); the planner simulates registered architectures"
    )


def process_baseline() -> int:
    """Peak RSS of a fresh interpreter that imports what a lowmem run imports and runs one
    autograd step on a tiny tensor (torch's engine and thread pools start there) (bytes)."""
    code = (
        "import lowmem.__main__, lowmem.api, lowmem.bench, lowmem.train, resource, torch;"
        "x = torch.ones(8, 8, requires_grad=True); (x @ x).sum().backward();"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])
