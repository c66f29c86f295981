"""Entry point for the 2-process test: ``torchrun --nproc_per_node 2 tests/_eval_dist_main.py OUT DATA``."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _eval_fixtures import tiny_llama, tiny_tokenizer  # noqa: E402

from lmul.eval.run import EvalConfig, run  # noqa: E402

if __name__ == "__main__":
    out, data = Path(sys.argv[1]), Path(sys.argv[2])
    arms = tuple(sys.argv[3].split(",")) if len(sys.argv) > 3 else ("exact",)
    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    cfg = EvalConfig(tasks=("arc_challenge", "piqa"), arms=arms, batch_size=4, max_length=1024, threads=1)
    run(cfg, out, loaded=(tiny_llama(len(tok)), tok, "tiny"), data_root=data)
