"""Result files: atomic JSON writes and the per-(arm, task) parts that make a run resumable."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part:
    write a temporary file in the same folder, fsync it, then ``os.replace`` it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    """Read JSON; a ``.gz`` path is gunzipped (committed results are kept compressed)."""
    if str(path).endswith(".gz"):
        import gzip

        with gzip.open(path, "rt", encoding="utf-8") as f:
            return json.load(f)
    with open(path, encoding="utf-8") as f:
        return json.load(f)


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
