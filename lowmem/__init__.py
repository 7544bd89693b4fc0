"""lowmem: peak-memory reduction for LoRA fine-tuning of LLMs on machines with little memory.

Reproduces and extends arXiv 2606.19528. In your own code:

    model = lowmem.prepare(hf_model_or_directory, "best")   # then any training loop
    model.save_pretrained(adapter_dir)                      # a stock PEFT adapter
    lowmem.merge(model, merged_dir)                         # or base + adapter, FP32
    lowmem.convert(hf_directory, out_dir, "best")           # INT4 once; prepare(out_dir, ...)
    lowmem.plan_budget("llama-3.2-3b", "2GiB", seq_len=4096) # what fits a memory budget

One module per technique; `lowmem.reference` holds the plain versions they are tested against.
The experiments: `python -m lowmem --help`.
"""

import logging

# bitsandbytes' CPU backend tries to fetch an optional kernel from a model hub at import and
# warns when it cannot; we never want that download, so the warning is noise here.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"

from lowmem.api import plan, prepare  # noqa: E402  (after the logging setting above)
from lowmem.convert import convert  # noqa: E402
from lowmem.merge import merge  # noqa: E402
from lowmem.planner import plan_budget  # noqa: E402
from lowmem.settings import (  # noqa: E402
    CheckpointSettings,
    KernelSettings,
    LoraSettings,
    QuantSettings,
    SoftmaxSettings,
)

__all__ = [
    "CheckpointSettings",
    "KernelSettings",
    "LoraSettings",
    "QuantSettings",
    "SoftmaxSettings",
    "convert",
    "merge",
    "plan",
    "plan_budget",
    "prepare",
]
