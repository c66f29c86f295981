"""Writing files so that nothing is lost: :func:`atomic_write` (a temporary file in the same folder,
flushed and fsynced, then ``os.replace``'d into place, so a reader sees the old file or the new one,
never a torn one) and :func:`replace_section` (one marked section of a shared markdown file)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Union

__all__ = ["atomic_write", "write_json", "replace_section"]


def atomic_write(path: Union[str, Path], data: Union[str, bytes]) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(path: Union[str, Path], obj: Any, indent: int | None = 1) -> Path:
    """:func:`atomic_write` of ``obj`` as JSON (UTF-8; objects JSON lacks, such as paths, as strings)."""
    return atomic_write(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=str) + "\n")


MARK = "<!-- lmul-bench:{key}:{end} -->"  # one marked section per key


def replace_section(path: Union[str, Path], key: str, title: str, body: str) -> Path:
    """Replace the section marked ``key`` of markdown file ``path`` by ``body`` (appended under
    ``### title`` when absent; the file is created if needed); other sections are kept."""
    path = Path(path)
    start, end = MARK.format(key=key, end="start"), MARK.format(key=key, end="end")
    block = f"{start}\n{body}\n{end}"
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    if start in old and end in old:
        new = old[: old.index(start)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + f"\n\n### {title}\n\n" + block + "\n"
    return atomic_write(path, new)
