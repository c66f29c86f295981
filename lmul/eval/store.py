"""Result files: atomic JSON writes and the per-(arm, task) parts that make a run resumable;
the lock that keeps two runs out of one run folder, and scratch folders that do not outlive their run."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from lmul.files import CorruptFile, open_lock, read_json, write_json  # noqa: F401  (the one reader and writer)
from lmul.files import atomic_write as write_atomic  # noqa: F401

LOCK_NAME = ".lock"


def part_path(run_dir: Path, kind: str, arm: str, task: str) -> Path:
    """Where one finished unit of work lives: ``parts/<kind>__<arm>__<task>.json``."""
    if kind not in ("acc", "div"):
        raise ValueError(f"part kind must be 'acc' or 'div', got {kind!r}")
    return Path(run_dir) / "parts" / f"{kind}__{arm}__{task}.json"


def load_parts(run_dir: Path, kind: str) -> dict[tuple[str, str], dict]:
    """All finished parts of ``kind`` as {(arm, task): part}."""
    out = {}
    for p in sorted((Path(run_dir) / "parts").glob(f"{kind}__*__*.json")):
        part = read_json(p)
        out[(part["arm"], part["task"])] = part
    return out


class RunBusy(RuntimeError):
    """Another live process holds the run folder's lock."""


@contextlib.contextmanager
def run_lock(run_dir: Path, wait: float = 0.0) -> Iterator[Path]:
    """Hold an exclusive ``flock`` on ``run_dir/.lock`` for the block (the folder is created).
    A symbolic link, hard link or FIFO planted as ``.lock`` is refused (ValueError), never written through.

    The kernel drops the lock when its process ends, however it ends, so a lock file left by a
    killed run never blocks; a live holder makes this wait up to ``wait`` seconds, then raise
    :class:`RunBusy` naming the holder's pid (written into the file)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = open_lock(path)  # O_NOFOLLOW, a regular file with one link: truncating it touches nothing else
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                    raise RunBusy(f"--out {run_dir} is in use by another lmul eval ({holder}); wait for it "
                                  f"to finish or choose another --out") from None
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the flock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_scratch(prefix: str, root: Path | None = None) -> list[Path]:
    """Remove ``<root>/<prefix><pid>-*`` folders of ours whose process is gone (left by a run that
    was killed with SIGKILL, the one exit no ``finally`` sees); return what was removed."""
    root = Path(root or tempfile.gettempdir())
    removed = []
    for d in root.glob(f"{prefix}*-*"):
        pid, sep, _ = d.name[len(prefix):].partition("-")
        try:
            if not (sep and pid.isdigit()) or d.is_symlink() or not d.is_dir() or d.stat().st_uid != os.getuid():
                continue
        except OSError:
            continue
        if not _pid_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


@contextlib.contextmanager
def scratch_dir(prefix: str = "lmul-tasks-", root: Path | None = None) -> Iterator[Path]:
    """A temporary folder ``<root>/<prefix><pid>-XXXX`` removed when the block ends, by return,
    exception, KeyboardInterrupt or SystemExit (``lmul.cli.main`` turns SIGTERM / SIGHUP into
    SystemExit). Folders of processes that died without cleaning up (SIGKILL) are swept first."""
    sweep_scratch(prefix, root)
    d = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=root))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
