"""Atomic writes and part files; the run-folder lock; scratch folders removed on every exit path."""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lmul.eval import store


def test_write_atomic_replaces(tmp_path):
    p = tmp_path / "sub" / "x.json"
    store.write_json(p, {"a": 1})
    store.write_json(p, {"a": 2})
    assert store.read_json(p) == {"a": 2}
    assert os.listdir(p.parent) == ["x.json"]  # no temporary files left


def test_interrupted_write_keeps_old_file(tmp_path, monkeypatch):
    p = tmp_path / "x.json"
    store.write_json(p, {"old": True})

    def boom(src, dst):
        raise KeyboardInterrupt  # the process is interrupted between write and rename

    monkeypatch.setattr(store.os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        store.write_json(p, {"new": True})
    monkeypatch.undo()
    assert store.read_json(p) == {"old": True}
    assert os.listdir(tmp_path) == ["x.json"]


def test_parts_roundtrip(tmp_path):
    store.write_json(store.part_path(tmp_path, "acc", "lmul-k3", "piqa"), {"arm": "lmul-k3", "task": "piqa"})
    store.write_json(store.part_path(tmp_path, "div", "exact", "piqa"), {"arm": "exact", "task": "piqa"})
    assert list(store.load_parts(tmp_path, "acc")) == [("lmul-k3", "piqa")]
    assert list(store.load_parts(tmp_path, "div")) == [("exact", "piqa")]
    with pytest.raises(ValueError, match="part kind"):
        store.part_path(tmp_path, "x", "exact", "piqa")


@pytest.mark.parametrize("name,data", [("a.json", b"{ broken"), ("b.json", b"\xff\xfe"), ("c.json.gz", b"not gzip"),
                                       ("d.json.gz", gzip.compress(b"[1,", mtime=0))])
def test_damaged_json_names_the_file(tmp_path, name, data):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(store.CorruptFile, match=rf"{name} is not a valid JSON file"):
        store.read_json(tmp_path / name)


ROOT = Path(__file__).resolve().parents[1]


def _child(code: str, *args: str) -> subprocess.Popen:
    """A python child running ``code`` that prints one line when ready."""
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], stdout=subprocess.PIPE, text=True,
                         cwd=ROOT)
    assert p.stdout.readline().strip() == "ready"
    return p


HOLD_LOCK = """
    import sys, time
    from lmul.eval import store
    with store.run_lock(sys.argv[1]):
        print("ready", flush=True)
        time.sleep(120)
"""


def test_lock_refuses_a_second_run_and_frees_on_death(tmp_path):
    holder = _child(HOLD_LOCK, str(tmp_path / "run"))
    try:
        with pytest.raises(store.RunBusy, match=rf"--out {tmp_path / 'run'} is in use by another lmul eval "
                                                rf"\(pid {holder.pid}, since .*\); wait for it"):
            with store.run_lock(tmp_path / "run"):
                pass
        with pytest.raises(store.RunBusy):
            with store.run_lock(tmp_path / "run", wait=0.3):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding it: the stale .lock file must not block
        holder.wait()
    assert (tmp_path / "run" / ".lock").exists()
    with store.run_lock(tmp_path / "run") as lock:
        assert lock.read_text().startswith(f"pid {os.getpid()},")
    with store.run_lock(tmp_path / "run"):  # released at the end of the block
        pass


def test_lock_is_held_by_run(tmp_path, monkeypatch):
    """lmul.eval.run.run takes the lock before any work (so nothing else is touched)."""
    from lmul.eval import run

    with store.run_lock(tmp_path / "run"):
        with pytest.raises(store.RunBusy):
            run.run(run.EvalConfig(), tmp_path / "run", allow_fetch=False)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]


SCRATCH = """
    import signal, sys, time
    from lmul.cli import _terminate
    from lmul.eval import store
    signal.signal(signal.SIGTERM, _terminate)
    try:
        with store.scratch_dir("lmul-test-", root=sys.argv[1]) as d:
            print("ready", flush=True)
            time.sleep(120)
    finally:
        print("cleaned", flush=True)
"""


def test_scratch_removed_on_sigterm(tmp_path):
    child = _child(SCRATCH, str(tmp_path))
    (made,) = tmp_path.glob(f"lmul-test-{child.pid}-*")
    child.send_signal(signal.SIGTERM)
    assert child.wait(60) == 128 + signal.SIGTERM
    assert "cleaned" in child.stdout.read() and not made.exists()


def test_scratch_of_a_killed_process_swept_by_the_next(tmp_path):
    child = _child(SCRATCH, str(tmp_path))
    (made,) = tmp_path.glob(f"lmul-test-{child.pid}-*")
    child.send_signal(signal.SIGKILL)  # no finally runs
    child.wait(60)
    assert made.exists()
    other = tmp_path / "lmul-test-abc"  # not of the <pid>-XXXX form: never touched
    other.mkdir()
    with store.scratch_dir("lmul-test-", root=tmp_path) as live:
        assert not made.exists() and other.exists()
        assert store.sweep_scratch("lmul-test-", tmp_path) == []  # ours is alive: kept
        assert live.exists()
    assert not live.exists()


def test_scratch_removed_on_exception(tmp_path):
    with pytest.raises(KeyError):
        with store.scratch_dir("lmul-test-", root=tmp_path) as d:
            (d / "f").write_text("x")
            raise KeyError("boom")
    assert list(tmp_path.iterdir()) == []
