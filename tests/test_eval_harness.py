"""Per-item records from lm-eval's logged samples (hand-made samples in lm-eval's log format)."""

from __future__ import annotations

import pytest

from lmul.eval import harness
from lmul.eval.tasks import TASKS


def _sample(doc_id, doc, args, target, acc, lls):
    return {"doc_id": doc_id, "doc": doc, "arguments": args, "target": target, "acc": acc,
            "resps": [[[ll, False]] for ll in lls]}


def test_mc_records_gold_and_subject():
    args = [("Q?\nAnswer:", " A"), ("Q?\nAnswer:", " B")]
    s = [_sample(1, {"subject": "anatomy"}, args, 1, 1.0, [-3.0, -1.0]),
         _sample(0, {"subject": "virology"}, args, 0, 0.0, [-2.0, -0.5])]
    recs = harness.item_records(TASKS["mmlu"], s)
    assert [r["doc_id"] for r in recs] == [0, 1]
    assert recs[0] == {"doc_id": 0, "context": "Q?\nAnswer:", "gold": " A", "subgroup": "virology", "acc": 0.0,
                       "lls": [-2.0, -0.5]}
    assert recs[1]["gold"] == " B" and recs[1]["subgroup"] == "anatomy"
    assert "subgroup" not in harness.item_records(TASKS["piqa"], s)[0]


def test_multiple_input_gold_comes_from_the_answer_field():
    """WinoGrande: lm-eval logs the shared continuation as the target; the gold prefix is ``answer``."""
    args = [("Ann thanked Bea because Ann", " had helped her."), ("Ann thanked Bea because Bea", " had helped her.")]
    s = [_sample(0, {"answer": "2"}, args, "had helped her.", 1.0, [-9.0, -4.0])]
    (rec,) = harness.item_records(TASKS["winogrande"], s)
    assert rec["context"] == "Ann thanked Bea because Bea" and rec["gold"] == " had helped her."


def test_a_run_logs_one_bar_per_stage_and_no_known_warnings(tmp_path, capfd):
    """Issue 25: `make run`'s log had 20 copies of lm-eval's warnings about HFLM(pretrained=<model
    object>) (our documented call) and lm-eval's and datasets' progress bars nested in ours. Now a
    run prints our two stage bars and nothing of theirs."""
    pytest.importorskip("lm_eval")
    from lmul.eval.run import EvalConfig, run
    from tests._eval_fixtures import tiny_llama, tiny_tokenizer, write_fixtures

    tok = tiny_tokenizer()
    data = write_fixtures(tmp_path / "data")
    cfg = EvalConfig(tasks=("arc_challenge",), arms=("exact", "lmul"), batch_size=4, max_length=1024, limit=2)
    capfd.readouterr()
    run(cfg, tmp_path / "out", loaded=(tiny_llama(len(tok)), tok, "tiny"), data_root=data)
    err = capfd.readouterr().err
    assert "accuracy (arm, task)" in err and "divergence (items)" in err
    for noise in ("model kwarg is not of type", "already-initialized model", "Running loglikelihood requests",
                  "Tokenizing inputs", "Generating", "  items"):
        assert noise not in err, noise


def test_quiet_lm_eval_drops_only_the_known_warnings(caplog):
    pytest.importorskip("lm_eval")
    import logging

    from lmul.eval.harness import quiet_lm_eval

    log = logging.getLogger("lm_eval.models.huggingface")
    with caplog.at_level(logging.WARNING), quiet_lm_eval():
        log.warning("`pretrained` model kwarg is not of type `str`. Many other model arguments may be ignored.")
        log.warning("something else went wrong")
    log.warning("`pretrained` model kwarg is not of type `str` (outside: shown)")
    msgs = [r.getMessage() for r in caplog.records]
    assert "something else went wrong" in msgs
    assert sum("not of type" in m for m in msgs) == 1 and "outside" in msgs[-1]


def test_model_loading_silences_only_torchao_import_noise(caplog):
    """models.load's quiet block drops torchao's and torch pytree's import warnings (CUDA-only
    libraries, Enum deprecation notes: four lines of every run's log), keeps their errors and
    other loggers' warnings, and restores the levels afterwards."""
    import logging

    from lmul.eval import models

    caplog.set_level(logging.WARNING)
    before = {n: logging.getLogger(n).level for n in models.QUIET_ON_LOAD}
    with models._quiet_optional_imports():
        logging.getLogger("torchao").warning("Failed to load _C_mxfp8.so")
        logging.getLogger("torch.utils._pytree").warning("is an Enum subclass")
        logging.getLogger("torchao").error("a real torchao error")
        logging.getLogger("transformers").warning("another library's warning")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["a real torchao error", "another library's warning"]
    assert {n: logging.getLogger(n).level for n in models.QUIET_ON_LOAD} == before
