"""Atomic writes and part files."""

from __future__ import annotations

import os

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
