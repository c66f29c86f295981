"""Glue to lm-evaluation-harness: one (already patched) model, one task, per-item scores.

Accuracy is computed by ``lm_eval.simple_evaluate`` with ``HFLM(pretrained=<model object>)``,
so prompts, few-shot sampling and metrics are lm-eval's own. Under ``torchrun`` (WORLD_SIZE > 1)
:class:`DistributedHFLM` reports the torch.distributed rank and world size, so lm-eval shards
the items across processes and gathers the per-item logs on rank 0.
"""

from __future__ import annotations

import logging
import os

import torch

from lmul.eval.tasks import TaskSpec


def dist_info() -> tuple[int, int]:
    """(rank, world size) of torch.distributed when initialized, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed(timeout_s: float | None = None) -> tuple[int, int]:
    """Join the process group when launched by torchrun / accelerate (WORLD_SIZE > 1); gloo on CPU.
    ``timeout_s``: how long a collective (a barrier) waits (torch's default when None)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        import datetime

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        kw = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        torch.distributed.init_process_group(backend, **kw)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))  # share the cores, do not oversubscribe
    return dist_info()


def barrier() -> None:
    if dist_info()[1] > 1:
        torch.distributed.barrier()


def make_lm(model, tok, batch_size: int, max_length: int):
    from lm_eval.models.huggingface import HFLM

    class DistributedHFLM(HFLM):
        """HFLM around a model object that takes rank / world size from torch.distributed."""

        def __init__(self, **kw):
            super().__init__(**kw)
            self._rank, self._world_size = dist_info()

        def all_gather(self, tensor):
            if self.world_size <= 1:
                return tensor
            out = [torch.zeros_like(tensor) for _ in range(self.world_size)]
            torch.distributed.all_gather(out, tensor)
            return torch.stack(out)

        def barrier(self):
            if self.world_size > 1:
                torch.distributed.barrier()

    return DistributedHFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, max_length=max_length)


def _gold(task: TaskSpec, sample: dict) -> tuple[str, str]:
    """(context, gold continuation) of a logged sample, for the divergence pass."""
    if task.kind == "generate":
        req = sample["doc"]["request"]
        return req["context"], req["continuation"]
    args = sample["arguments"]
    if task.gold_field:
        i = int(sample["doc"][task.gold_field]) - 1
    else:
        i = int(sample["target"]) if task.kind == "mc" else 0
    ctx, cont = args[i][0], args[i][1]
    return ctx, cont


def item_records(task: TaskSpec, samples: list[dict]) -> list[dict]:
    """Per-item scores from lm-eval's logged samples, sorted by doc_id."""
    out = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        ctx, cont = _gold(task, s)
        rec = {"doc_id": int(s["doc_id"]), "context": ctx, "gold": cont}
        if task.subgroup_field:
            rec["subgroup"] = str(s["doc"][task.subgroup_field])
        if task.kind == "mc":
            rec["acc"] = float(s["acc"])
            rec["lls"] = [float(r[0][0]) for r in s["resps"]]  # log-likelihood of each choice
            if "acc_norm" in s:
                rec["acc_norm"] = float(s["acc_norm"])
        elif task.kind == "loglik":
            rec["acc"] = float(s["acc"])
            rec["ll"] = float(s["resps"][0][0][0])
        else:
            rec["acc"] = float(s["exact_match"])
            rec["output"] = str(s["resps"][0][0])[:2000]
        out.append(rec)
    return out


def evaluate(lm, task: TaskSpec, task_manager, limit: int | None, seed: int) -> list[dict] | None:
    """Per-item records of ``task`` (on rank 0; None on other ranks)."""
    from unittest import mock

    from lm_eval import evaluator, simple_evaluate

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    # lm-eval's add_env_info runs `pip list` & co. (seconds per call); run.versions() records ours once
    with mock.patch.object(evaluator, "add_env_info", lambda results: None):
        res = simple_evaluate(
            model=lm, tasks=[task.lm_eval_name], task_manager=task_manager, limit=limit, log_samples=True,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
            bootstrap_iters=0, verbosity="WARNING",
        )
    if res is None:  # non-zero ranks
        return None
    return item_records(task, res["samples"][task.lm_eval_name])
