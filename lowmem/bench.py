"""One Table 1 cell: build a model under a meter, apply a stack row, measure one step, record it.

`run_cell` never raises for a run that started: an out-of-memory error, or a simulated peak
above the A100's 80 GiB, becomes an `oom` record (with the predicted need kept), and any other
crash a `failed` record carrying the error. Bad input (unknown model, meter or stack row) is
refused before any work starts.
"""

from __future__ import annotations

import contextlib
import functools
import time
import traceback
from pathlib import Path

import torch

from lowmem import paper, results
from lowmem.checkpoint import checkpointing_of
from lowmem.config import StackConfig
from lowmem.converted import check_loadable
from lowmem.loader import load_quantized, loads_by_tensor, skeleton
from lowmem.loss import compute_loss
from lowmem.memory import METERS, ProcessRss, meter_context
from lowmem.meter import measure_step
from lowmem.models import (
    build_model,
    count_parameters,
    get_spec,
    read_config,
    stored_weight_bytes,
    weights_identity,
)
from lowmem.stack import apply_stack, benchmark_batch


def run_cell(model_name: str, cfg: StackConfig, meter: str, model_path: str | None = None) -> dict:
    """Measure one forward + loss + backward step of `model_name` under `cfg`; return a record."""
    get_spec(model_name)
    if meter not in METERS:
        raise ValueError(f"unknown meter {meter!r}; choose one of {', '.join(METERS)}")
    if meter == "simulated" and model_path is not None:
        raise ValueError(
            "the simulated meter needs no weights: drop model_path, or use the "
            "cpu or cuda meter to measure real ones"
        )
    weights = weights_identity(model_path) if model_path is not None else None
    if model_path is not None:  # a converted directory this row cannot load: refused up front
        check_loadable(Path(model_path), cfg)
    rid = results.run_id(model_name, cfg, meter, weights)  # refuses a name unsafe for a file
    start = time.perf_counter()
    metrics, error, status = {}, None, "ok"
    device = "cuda" if meter == "cuda" else "cpu"
    try:
        with meter_context(meter) as dev, contextlib.ExitStack() as cleanup:
            if meter == "cuda":
                device = torch.cuda.get_device_name(dev)
            torch.manual_seed(cfg.seed)
            process = ProcessRss()
            process.start()
            if loads_by_tensor(cfg, model_path):  # never the FP32 model (lowmem.loader)
                n_params = count_parameters(skeleton(read_config(model_path)))[0]
                model = load_quantized(model_path, cfg, meter, device=dev)
            else:
                init = "fake" if meter == "simulated" else "random"
                model = build_model(model_name, init, dev, model_path)
                n_params = count_parameters(model)[0]
                model = apply_stack(model, cfg, meter)
            ckpt = checkpointing_of(model)
            streamed = 0
            if ckpt is not None:
                cleanup.callback(ckpt.close)  # offload files go on success, error or Ctrl-C
                streamed = ckpt.stats().get("weights_bytes_written", 0)
            n_trainable = count_parameters(model)[1]
            batch = benchmark_batch(cfg, model.config.vocab_size, dev)
            # from the checkpointing row on, the step keeps only the loss (Table 1 implies it)
            loss_fn = functools.partial(compute_loss, cfg=cfg)
            process.setup_done()
            metrics = measure_step(
                model, batch, meter, keep_outputs=not cfg.enabled("checkpoint"), loss_fn=loss_fn
            )
            if meter == "cpu":  # the whole process beside the step: setup is not hidden
                metrics["process"] = process.figures(metrics["peak_rss_bytes"])
            if ckpt is not None:
                metrics["offload"] = ckpt.stats()
            stored = stored_weight_bytes(model) + streamed
            metrics.update(
                parameters=n_params,
                trainable_parameters=n_trainable,
                stored_weight_bytes=stored,
                bytes_per_parameter=stored / n_params,
            )
            del model, batch
        if meter == "simulated" and metrics["peak_bytes"] > paper.A100_BYTES:
            status = "oom"
            metrics["budget_bytes"] = paper.A100_BYTES
    except (torch.OutOfMemoryError, MemoryError) as err:
        status, error = "oom", f"{type(err).__name__}: {err}"
    except Exception as err:  # a crash is a result too: record it, the grid carries on
        status, error = "failed", "".join(traceback.format_exception(err))[-4000:]
    return results.cell_record(
        rid,
        model_name,
        cfg,
        meter,
        metrics,
        status,
        device,
        weights or {"path": None, "init": "random" if meter != "simulated" else "fake"},
        error,
        elapsed_s=round(time.perf_counter() - start, 2),
    )


def table1_cells(stacks: tuple[str, ...], models: tuple[str, ...] | None = None) -> list:
    """The Table 1 grid: each paper model x each stack row x the paper's five contexts."""
    return [
        (m, StackConfig(stack=s, seq_len=t))
        for m in (models or paper.paper_models())
        for s in stacks
        for t in paper.CONTEXTS
    ]
