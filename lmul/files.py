"""Every file the package writes goes through here, and every JSON it reads.

Writing: :func:`atomic_write` puts the bytes in a new temporary file in the target's folder
(created ``O_EXCL``, so nothing planted there is followed), flushes and fsyncs it, gives it the
mode a plain ``open`` would (``0o666 & ~umask``, i.e. 0644 under the usual umask) and
``os.replace``'s it onto the path: a reader sees the old file or the new one, never a torn one,
and a symbolic link planted at the path is replaced itself; its target is never written.
:func:`save_figure` and :func:`save_torch` serialise to memory and then :func:`atomic_write`;
:func:`atomic_folder` does the same for a writer that makes a folder of files
(``save_pretrained``); :func:`replace_section` rewrites one marked section of a shared markdown
file. The one file that
is opened in place, a run's lock, is opened by :func:`open_lock` with ``O_NOFOLLOW`` and refused
unless it is a regular file with one link, so truncating it can touch nothing else.

Reading: :func:`read_bytes` opens only regular files (``O_NONBLOCK`` then ``fstat``, so a FIFO or a
device is refused instead of blocking forever) and :func:`read_json` turns every kind of damage
(bad UTF-8 or gzip, invalid JSON, nesting too deep for the parser) into :class:`CorruptFile`,
a ValueError naming the file. Reads follow symbolic links (Hugging Face caches are made of them);
only the target's type matters there."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Union

__all__ = ["atomic_write", "write_json", "replace_section", "save_figure", "save_torch", "atomic_folder", "open_lock",
           "open_regular", "read_bytes", "read_text", "read_json", "parse_json", "CorruptFile", "file_mode"]

PathLike = Union[str, "os.PathLike[str]"]


class CorruptFile(ValueError):
    """A file that is not what it should be (invalid JSON, gzip or UTF-8, not a regular file);
    the message names the file."""


def file_mode(executable: bool = False) -> int:
    """The mode ``open(path, "w")`` would give a new file: ``0o666 & ~umask`` (``0o777`` if
    ``executable``). The umask is read from /proc where it can be, since setting it to read it
    back is racy with other threads creating files."""
    umask = None
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    umask = int(line.split()[1], 8)
                    break
    except OSError:
        pass
    if umask is None:
        umask = os.umask(0o022)
        os.umask(umask)
    return (0o777 if executable else 0o666) & ~umask


def atomic_write(path: PathLike, data: Union[str, bytes], executable: bool = False) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically, creating its folder; the
    file gets :func:`file_mode`. A symbolic link at ``path`` is replaced, not written through."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode(executable))
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_figure(fig: Any, path: PathLike, **savefig_kwargs: Any) -> Path:
    """``fig.savefig`` into memory (format from the suffix), then :func:`atomic_write` to ``path``."""
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".") or "png", **savefig_kwargs)
    return atomic_write(path, buf.getvalue())


def save_torch(obj: Any, path: PathLike) -> Path:
    """``torch.save`` into memory, then :func:`atomic_write` to ``path``."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write(path, buf.getvalue())


@contextlib.contextmanager
def atomic_folder(path: PathLike) -> Iterator[Path]:
    """Yield a new empty folder (``.<name>.XXXX.tmp`` beside ``path``) for a writer that makes
    several files of its own (``save_pretrained``); when the block ends without error the folder
    replaces ``path`` (an old folder there is removed; a symbolic link there is removed, never
    followed). On error the new folder is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, file_mode(executable=True))
        yield tmp
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            path.unlink()
        elif path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.rename(path, old / path.name)
            shutil.rmtree(old)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def open_lock(path: PathLike) -> int:
    """Open (creating, mode 0644) a lock file for reading and writing and return its descriptor.

    ``O_NOFOLLOW``: a symbolic link at ``path`` is refused (ValueError), and so is anything but a
    regular file with a single link (a hard link to another file, a FIFO), so that the caller may
    truncate and rewrite the descriptor without touching any other file."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ValueError(f"{path} is a symbolic link; refusing to write through it (remove it)") from None
        if e.errno == errno.ENXIO:  # a FIFO with no reader
            raise ValueError(f"{path} is not a regular file; refusing to use it as a lock (remove it)") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        what = "not a regular file" if not stat.S_ISREG(st.st_mode) else f"a file with {st.st_nlink} hard links"
        raise ValueError(f"{path} is {what}; refusing to use it as a lock (remove it)")
    return fd


def open_regular(path: PathLike) -> io.BufferedReader:
    """Open a regular file for reading (binary). A FIFO, socket, device or folder raises
    (:class:`CorruptFile`, IsADirectoryError) instead of blocking: it is opened ``O_NONBLOCK``
    and checked with ``fstat`` before any read (the flag does nothing to a regular file)."""
    path = Path(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(path))
        if not stat.S_ISREG(st.st_mode):
            raise CorruptFile(f"{path} is not a regular file (a FIFO, socket or device); refusing to read it")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: PathLike) -> bytes:
    """The bytes of a regular file (:func:`open_regular`)."""
    with open_regular(path) as f:
        return f.read()


def read_text(path: PathLike) -> str:
    """:func:`read_bytes` decoded as UTF-8 (bad UTF-8 raises :class:`CorruptFile` naming the file)."""
    data = read_bytes(path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorruptFile(f"{path} is not UTF-8 text ({e})") from None


def read_json(path: PathLike) -> Any:
    """Read JSON from a regular file; a ``.gz`` path is gunzipped (committed results are kept
    compressed). Any damage raises :class:`CorruptFile` naming the file; a missing file raises
    FileNotFoundError."""
    import gzip
    import zlib

    data = read_bytes(path)
    try:
        if str(path).endswith(".gz"):
            data = gzip.decompress(data)
        text = data.decode("utf-8")
    except (ValueError, EOFError, gzip.BadGzipFile, zlib.error) as e:  # UnicodeDecodeError
        raise CorruptFile(f"{path} is not a valid JSON file ({type(e).__name__}: {e}); "
                          f"delete or restore it") from None
    return parse_json(text, f"{path} is not a valid JSON file", "; delete or restore it")


def parse_json(text: str, what: str, hint: str = "") -> Any:
    """``json.loads(text)``; any failure, nesting too deep for the parser included (RecursionError),
    raises :class:`CorruptFile` as ``"<what> (<why>)<hint>"``."""
    try:
        return json.loads(text)
    except RecursionError:
        raise CorruptFile(f"{what} (malformed: nested too deeply to parse){hint}") from None
    except ValueError as e:  # JSONDecodeError
        raise CorruptFile(f"{what} ({type(e).__name__}: {e}){hint}") from None


def write_json(path: PathLike, obj: Any, indent: int | None = 1) -> Path:
    """:func:`atomic_write` of ``obj`` as JSON (UTF-8; objects JSON lacks, such as paths, as strings)."""
    return atomic_write(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=str) + "\n")


MARK = "<!-- lmul-bench:{key}:{end} -->"  # one marked section per key


def replace_section(path: PathLike, key: str, title: str, body: str) -> Path:
    """Replace the section marked ``key`` of markdown file ``path`` by ``body`` (appended under
    ``### title`` when absent; the file is created if needed); other sections are kept."""
    path = Path(path)
    start, end = MARK.format(key=key, end="start"), MARK.format(key=key, end="end")
    block = f"{start}\n{body}\n{end}"
    old = read_text(path) if path.exists() else "# Benchmark results\n"
    if start in old and end in old:
        new = old[: old.index(start)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + f"\n\n### {title}\n\n" + block + "\n"
    return atomic_write(path, new)
