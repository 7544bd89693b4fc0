"""Convert, then train, a 3B checkpoint on this CPU; each command measured by the OS.

    python experiments/edge/run.py --models llama-3.2-3b qwen-2.5-3b --seq-lens 1024 2048

For each model: `python -m lowmem convert SRC CONVERTED --profile best`, then for each context
`python -m lowmem train --model-path CONVERTED --stack best --seq-len T --steps N` (batch 1,
eval off, one checkpoint at the end). Each command runs under `/usr/bin/time -v` (its
"Maximum resident set size", wall, user and system time, page faults, file-system inputs),
while this script samples /proc/PID/status of the Python process every 0.1 s (RSS, RssAnon,
RssFile at the peak; a timeline). One record per (model, phase, seq_len) goes to
results/raw/edge/ (meter "os", device "cpu"); a train record also carries the run's
summary.json (tracked step peak, whole-process figures, tokens/s, time shares, disk bytes).

SRC: ~/.cache/lowmem/edge/<model> (make_checkpoint.py); CONVERTED: SRC + "-best".
`--tag` names a variant (e.g. "trim"), `--env K=V` sets environment variables of the measured
commands (e.g. MALLOC_ARENA_MAX=1); a recorded run is skipped unless `--force`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

from lowmem import results

EXPERIMENT = "edge"
ROOT = Path("~/.cache/lowmem/edge").expanduser()
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TIME_FIELDS = {
    "Maximum resident set size (kbytes)": "max_rss_kb",
    "Elapsed (wall clock) time (h:mm:ss or m:ss)": "wall",
    "User time (seconds)": "user_s",
    "System time (seconds)": "sys_s",
    "Major (requiring I/O) page faults": "major_faults",
    "Minor (reclaiming a frame) page faults": "minor_faults",
    "File system inputs": "fs_inputs",
    "File system outputs": "fs_outputs",
    "Exit status": "exit_status",
}


def machine() -> dict:
    cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
    mem = re.search(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text())
    return {
        "cpu": cpu.group(1) if cpu else None,
        "cores": os.cpu_count(),
        "mem_total_bytes": int(mem.group(1)) * 1024 if mem else None,
        "shared": "another developer ran tests on the same 2 cores: timings are noisy",
    }


def measured(cmd: list[str], env: dict, log: Path) -> dict:
    """Run `cmd` under /usr/bin/time -v; its figures plus the sampled RSS breakdown."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(["/usr/bin/time", "-v", *cmd], stdout=out, stderr=out, env=env)
        child, peak, timeline, last = None, {"rss": 0}, [], 0.0
        while proc.poll() is None:
            if child is None:
                kids = psutil.Process(proc.pid).children()
                child = kids[0].pid if kids else None
            status = _status(child) if child else None
            now = time.time() - start
            if status:
                if status["rss"] > peak["rss"]:
                    peak = {**status, "at_s": round(now, 1)}
                if now - last >= 2.0:
                    timeline.append([round(now, 1), status["rss"], status["anon"], status["file"]])
                    last = now
            time.sleep(0.1)
    text = log.read_text()
    got = {}
    for line in text.splitlines():
        key, _, value = line.strip().rpartition(": ")
        if key in TIME_FIELDS:
            got[TIME_FIELDS[key]] = value
    wall = got.pop("wall", "0:0")
    parts = [float(x) for x in wall.split(":")]
    seconds = sum(p * 60**i for i, p in enumerate(reversed(parts)))
    return {
        "max_rss_bytes": int(got.get("max_rss_kb", 0)) * 1024,
        "max_rss_gib": int(got.get("max_rss_kb", 0)) * 1024 / 2**30,
        "wall_s": seconds,
        **{k: float(v) if "." in v else int(v) for k, v in got.items() if k != "max_rss_kb"},
        "sampled_peak": peak,
        "timeline": timeline,  # [seconds, rss, anon, file] every ~2 s
    }


def _status(pid: int) -> dict | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    kb = dict(re.findall(r"^(VmRSS|RssAnon|RssFile|RssShmem|VmHWM):\s*(\d+)", text, re.M))
    if "VmRSS" not in kb:
        return None
    names = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem"}
    return {names[k]: int(v) * 1024 for k, v in kb.items() if k in names}


def record(rid: str, model: str, phase: str, seq_len, cmd, env_set, metrics, extra=None) -> Path:
    ok = metrics.get("exit_status", 1) == 0
    return results.write_record(
        EXPERIMENT,
        {
            "status": "ok" if ok else "failed",
            "run_id": rid,
            "model": model,
            "phase": phase,
            "seq_len": seq_len,
            "meter": "os",
            "device": "cpu",
            "command": " ".join(cmd),
            "env": env_set,
            "machine": machine(),
            "metrics": metrics,
            **(extra or {}),
            "error": None if ok else "exit status != 0; see the log",
            "environment": results.environment(),
        },
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["llama-3.2-3b", "qwen-2.5-3b"])
    p.add_argument("--seq-lens", nargs="+", type=int, default=[1024, 2048])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--phases", nargs="+", default=["convert", "train"])
    p.add_argument("--tag", default="", help="variant name, appended to the run ids")
    p.add_argument("--env", action="append", default=[], metavar="K=V")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the commands")
    p.add_argument("--force", action="store_true")
    args = p.parse_args()
    env_set = dict(kv.split("=", 1) for kv in args.env) | {"OMP_NUM_THREADS": str(args.threads)}
    env = {**os.environ, **OFFLINE, **env_set}
    py = [sys.executable, "-m", "lowmem"]
    suffix = f"__{args.tag}" if args.tag else ""
    logs = Path("/tmp/edge/logs")
    for model in args.models:
        src, conv = ROOT / model, ROOT / f"{model}-best"
        if "convert" in args.phases:
            rid = f"{model}__convert{suffix}"
            if args.force or not results.record_path(EXPERIMENT, rid).exists():
                cmd = [*py, "convert", str(src), str(conv), "--profile", "best", "--force"]
                m = measured(cmd, env, logs / f"{rid}.log")
                print(record(rid, model, "convert", None, cmd, env_set, m), flush=True)
        if "train" not in args.phases:
            continue
        for seq_len in args.seq_lens:
            rid = f"{model}__train__T{seq_len}{suffix}"
            if not args.force and results.record_path(EXPERIMENT, rid).exists():
                continue
            out = Path("/tmp/edge/runs") / rid
            shutil.rmtree(out, ignore_errors=True)
            cmd = [
                *py, "train", "--model", model, "--model-path", str(conv), "--stack", "best",
                "--seq-len", str(seq_len), "--steps", str(args.steps), "--batch-size", "1",
                "--eval-every", "0", "--checkpoint-every", "0", "--task", "shakespeare",
                "--out", str(out),
            ]  # fmt: skip
            m = measured(cmd, env, logs / f"{rid}.log")
            summary_file = out / "summary.json"
            summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
            print(record(rid, model, "train", seq_len, cmd, env_set, m, {"summary": summary}))


if __name__ == "__main__":
    main()
