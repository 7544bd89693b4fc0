"""What a `train` process holds before its model exists, stage by stage (one record).

    python experiments/edge/baseline.py llama-3.2-3b ~/.cache/lowmem/edge/llama-3.2-3b 1024

RSS, anonymous and file-backed (/proc/self/status), after: the interpreter; torch;
transformers; the Llama / Qwen2 modeling code; lowmem's training modules; the tokenizer of the
directory; the Shakespeare task tokenized at T tokens; malloc_trim(0); dropping the tokenizer.
Written to results/raw/edge/<model>__baseline__T<T>.json.
"""

from __future__ import annotations

import gc
import sys


def status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


stages = [("interpreter", status())]
import torch  # noqa: E402

stages.append(("torch", status()))
import transformers  # noqa: E402, F401

stages.append(("transformers", status()))
from transformers import LlamaForCausalLM, Qwen2ForCausalLM  # noqa: E402, F401

stages.append(("modeling code", status()))
import lowmem.train  # noqa: E402, F401
from lowmem import results  # noqa: E402
from lowmem.data import load_task  # noqa: E402
from lowmem.models import load_tokenizer  # noqa: E402
from lowmem.process import trim_malloc  # noqa: E402

stages.append(("lowmem.train", status()))
model, path, seq_len = sys.argv[1], sys.argv[2], int(sys.argv[3])
tokenizer = load_tokenizer(model, path)
stages.append(("tokenizer", status()))
task = load_task("shakespeare", tokenizer, seq_len, seed=0)
stages.append(("task tokenized", status()))
trim_malloc()
stages.append(("malloc_trim", status()))
del tokenizer
gc.collect()
trim_malloc()
stages.append(("tokenizer dropped", status()))
record = {
    "status": "ok",
    "run_id": f"{model}__baseline__T{seq_len}",
    "model": model,
    "phase": "baseline",
    "seq_len": seq_len,
    "meter": "os",
    "device": "cpu",
    "command": " ".join(["python", *sys.argv]),
    "metrics": {
        "stages": [{"stage": name, **values} for name, values in stages],
        "train_rows": len(task.train),
        "train_arrow_bytes": task.train.data.nbytes,
        "torch_threads": torch.get_num_threads(),
    },
    "error": None,
    "environment": results.environment(),
}
print(results.write_record("edge", record))
for name, values in stages:
    print(f"{name:18s} " + "  ".join(f"{k} {v / 2**20:7.0f} MiB" for k, v in values.items()))
