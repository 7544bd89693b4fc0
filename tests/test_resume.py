"""A run folder after a crash (a torn or corrupt log.jsonl) and the modes of what runs write."""

import os
import re
import shutil
import stat

import pytest
from datasets import Dataset

from lowmem import results, resume
from lowmem.train import make_config, train, training_model

CFG = make_config("lora", steps=4, lr=1e-2, batch_size=2, eval_every=2, checkpoint_every=2)
KEYS = ("step", "loss", "lr", "eval_loss", "trainable_tokens", "grad_norm")


class Killed(Exception):
    pass


def dataset() -> Dataset:
    ids = [[(3 * i + j) % 17 + 3 for j in range(12)] for i in range(8)]
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def run(out, cfg=CFG, stop_at=None, resume_run=False) -> dict | None:
    """Train tiny-llama; `stop_at`: die, as if killed, once that step is logged (and
    checkpointed, if it is a checkpoint step)."""

    def die(entry):
        if entry["step"] == stop_at:
            raise Killed

    with training_model("tiny-llama", cfg.stack) as model:
        try:
            return train(
                model, cfg, dataset(), dataset(), out, resume_run, progress=False, callback=die
            )
        except Killed:
            return None


def trace(out) -> list[dict]:
    return [{k: e[k] for k in KEYS if k in e} for e in resume.read_log(out)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A straight run, and the same run killed after step 3 (its checkpoint is step 2's)."""
    root = tmp_path_factory.mktemp("runs")
    run(root / "straight")
    assert run(root / "killed", stop_at=3) is None
    assert resume.load_checkpoint(root / "killed")["step"] == 2
    return root


def killed_copy(runs, tmp_path):
    return shutil.copytree(runs / "killed", tmp_path / "run")


# --- a torn or corrupt log --------------------------------------------------------------------


def test_a_torn_last_log_line_is_dropped_and_the_resumed_run_equals_a_straight_one(runs, tmp_path):
    """A killed run tears at most the line it was writing: that of a step after its last
    checkpoint (train logs a step, and its evaluation, before checkpointing it), which the
    resumed run redoes and logs again."""
    out = killed_copy(runs, tmp_path)
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 2.71')  # killed inside step 4's append_log
    assert [e["step"] for e in resume.read_log(out)] == [0, 1, 2, 2, 3]
    run(out, resume_run=True)
    assert trace(out) == trace(runs / "straight")
    assert (out / "log.jsonl").read_text().endswith("}\n")


@pytest.mark.parametrize(
    "line, bad",
    [
        (2, "garbage"),
        (3, '{"step": 2, "loss":'),
        (6, "\xff\xfe"),
        (6, "[1, 2]"),
        (1, '{"loss": 1}'),
    ],
)
def test_a_corrupt_log_line_is_refused_naming_the_file_and_line(runs, tmp_path, line, bad):
    """Any undecodable line but a torn last one (even the last line, when its newline was
    written) is refused, and the log is left as it was."""
    out = killed_copy(runs, tmp_path)
    lines = (out / "log.jsonl").read_bytes().splitlines(keepends=True)
    lines[line - 1 : line] = [bad.encode("latin-1") + b"\n"]
    (out / "log.jsonl").write_bytes(b"".join(lines))
    where = rf"^{re.escape(str(out / 'log.jsonl'))} line {line}: "
    with pytest.raises(ValueError, match=where) as err:
        resume.read_log(out)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=where):
        run(out, resume_run=True)
    assert (out / "log.jsonl").read_bytes() == b"".join(lines)


# --- modes: the umask decides, as for any file the user creates --------------------------------


@pytest.fixture
def umask():
    """Set the process umask for one test, and put the old one back."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def test_run_folders_and_records_follow_the_umask(tmp_path, results_tmp, umask):
    cfg = make_config("lora", steps=1, eval_every=0)
    for mask in (0o022, 0o077):
        umask(mask)
        out = tmp_path / f"run{mask:o}"
        run(out, cfg)
        run(out, cfg, resume_run=True)  # rewrites log.jsonl and run.json
        record = results.write_record(f"modes{mask:o}", {"status": "ok", "run_id": "tiny"})
        paths = [record, record.parent, out, *out.rglob("*")]
        names = {p.relative_to(out).as_posix() for p in out.rglob("*")}
        assert {"run.json", "log.jsonl", "summary.json", "checkpoint/state.pt"} <= names
        assert "adapter/adapter_model.safetensors" in names  # safetensors writes 0600 itself
        for path in paths:
            want = (0o777 if path.is_dir() else 0o666) & ~mask
            assert stat.S_IMODE(path.stat().st_mode) == want, (oct(mask), path)
