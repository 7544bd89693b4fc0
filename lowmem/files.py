"""Files lowmem leaves for the user: written atomically, with the modes the user's umask gives.

Policy: records, run folders, checkpoints and adapters are created like any file the user
creates: files 0666 & ~umask, folders 0777 & ~umask (0644 / 0755 under the usual umask 022,
0600 / 0700 under 077), so whoever may read the user's other files may read these too.
`tempfile.mkstemp` / `mkdtemp`, through which every atomic write goes, create 0600 / 0700
whatever the umask (right for secrets in a shared /tmp, wrong for results), and so does
safetensors >= 0.8 (it too writes through a temporary file; safetensors issue #782): what they
create gets the policy's mode before it is renamed into place, so a final name never shows
another mode. A temporary file or folder is named `.<name>.<random>.tmp` beside its target; one
left by a killed writer is removed by `lowmem.resume.open_run`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def umask() -> int:
    """The process umask: read from /proc on Linux, else set and put back at once."""
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o077)  # for the instant before it is put back, stricter, not looser
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~umask()


def folder_mode() -> int:
    return 0o777 & ~umask()


def write_atomic(path: Path, text: str) -> None:
    """Write `text` (UTF-8) as `path`, whole or not at all (`new_file`)."""
    with new_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def new_file(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` for a writer to fill; when the block ends it gets the
    policy's mode and is renamed to `path`, so `path` is either the old file or the whole new
    one. On failure the temporary file is removed."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def temp_folder(path: Path) -> Path:
    """A new empty folder beside `path`, with the policy's mode, to be renamed to `path`."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, folder_mode())
    return tmp


def seal(folder: Path) -> None:
    """Give each file a writer left in `folder` the policy's mode and flush it to disk, before
    the folder is renamed into place (safetensors >= 0.8 writes 0600 whatever the umask)."""
    mode = file_mode()
    for file in folder.iterdir():
        os.chmod(file, mode)
        with open(file, "rb") as f:
            os.fsync(f.fileno())


@contextlib.contextmanager
def new_folder(out: Path) -> Iterator[Path]:
    """Fill a folder that becomes `out` whole or not at all: yields a temporary folder beside
    it, sealed and renamed into place when the block ends. `out` must not exist or be empty;
    on failure the temporary folder and the parent folders this call created are removed."""
    check_out_dir(out)
    created = [p for p in reversed(out.absolute().parents) if not p.exists()]  # outermost first
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_folder(out)
    try:
        yield tmp
        seal(tmp)
        check_out_dir(out)  # another process may have written it meanwhile
        os.replace(tmp, out)  # POSIX: replaces an empty folder, fails on a non-empty one
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in reversed(created):  # innermost first; only folders this call made
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise


def check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(
            f"out_dir {str(out)!r} already exists and is not an empty folder; choose a new "
            "or empty folder (lowmem never overwrites one)"
        )
