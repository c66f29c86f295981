"""Glue to lm-evaluation-harness: one (already patched) model, one task, per-item scores.

Accuracy is computed by ``lm_eval.simple_evaluate`` with ``HFLM(pretrained=<model object>)``,
so prompts, few-shot sampling and metrics are lm-eval's own. Under ``torchrun`` (WORLD_SIZE > 1)
:class:`DistributedHFLM` reports the torch.distributed rank and world size, so lm-eval shards
the items across processes and gathers the per-item logs on rank 0.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

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


# lm-eval's warnings about the documented way we call it (HFLM(pretrained=<model object>)), once per
# (arm, task) unit: 20 copies in `make run`'s log
KNOWN_LM_EVAL_WARNINGS = (
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
)


class _DropKnown(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(KNOWN_LM_EVAL_WARNINGS)


_DROP_KNOWN = _DropKnown()


@contextlib.contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """Within: lm-eval's known warnings about our model-object call are dropped (a filter on the
    logger that emits them, so every other lm-eval message still shows), its per-document progress
    bar is off (our ``accuracy (arm, task)`` bar covers the stage; the request bars are off in
    :func:`make_lm`'s class), and so are ``datasets``' ("Generating validation split")."""
    from unittest import mock

    import datasets
    from lm_eval.api import task as lm_task

    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    hf_logger.addFilter(_DROP_KNOWN)
    bars_were_off = datasets.is_progress_bar_enabled() is False
    datasets.disable_progress_bars()
    try:
        with mock.patch.object(lm_task, "tqdm", lambda it, *a, **k: it):
            yield
    finally:
        hf_logger.removeFilter(_DROP_KNOWN)
        if not bars_were_off:
            datasets.enable_progress_bars()


def make_lm(model, tok, batch_size: int, max_length: int):
    from lm_eval.models.huggingface import HFLM

    class DistributedHFLM(HFLM):
        """HFLM around a model object that takes rank / world size from torch.distributed; its
        request progress bars are off (ours covers the stage)."""

        def __init__(self, **kw):
            super().__init__(**kw)
            self._rank, self._world_size = dist_info()

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=True)

        def all_gather(self, tensor):
            if self.world_size <= 1:
                return tensor
            out = [torch.zeros_like(tensor) for _ in range(self.world_size)]
            torch.distributed.all_gather(out, tensor)
            return torch.stack(out)

        def barrier(self):
            if self.world_size > 1:
                torch.distributed.barrier()

    with quiet_lm_eval():
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
    with mock.patch.object(evaluator, "add_env_info", lambda results: None), quiet_lm_eval():
        res = simple_evaluate(
            model=lm, tasks=[task.lm_eval_name], task_manager=task_manager, limit=limit, log_samples=True,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
            bootstrap_iters=0, verbosity="WARNING",
        )
    if res is None:  # non-zero ranks
        return None
    return item_records(task, res["samples"][task.lm_eval_name])
