"""scripts/gpu_eval_check.py (the `eval` step of `make gpu-check`) in its CPU dry run: synthetic
assets, `lmul eval` twice, both runs in eval_check.json and no changed prediction cpu vs cpu."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
import torch  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_eval_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_eval_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_cpu_vs_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("LMUL_HOME", str(tmp_path / "unused"))  # restored afterwards (the script sets it)
    threads = torch.get_num_threads()
    try:
        assert _load().main(["--dry-run", "--out", str(tmp_path / "chk")]) == 0
    finally:
        torch.set_num_threads(threads)
    res = json.loads((tmp_path / "chk" / "eval_check.json").read_text())
    assert [r["device"] for r in res["runs"]] == ["cpu", "cpu"] and all(r["rc"] == 0 for r in res["runs"])
    assert res["runs"][0]["out"] != res["runs"][1]["out"]
    assert {(r["task"], r["arm"]) for r in res["compare"]} == {
        (t, a) for t in ("arc_challenge", "piqa", "winogrande") for a in ("exact", "lmul")}
    assert res["items_total"] == 2 * (3 + 2 + 2) and res["changed_total"] == 0
    for r in res["compare"]:
        assert r["changed"] == 0 and r["max_ll_diff"] == 0 and r["acc_device"] == r["acc_cpu"]
    assert "prediction changed between devices: 0 of 14" in (tmp_path / "chk" / "eval_check.md").read_text()


def test_cuda_unavailable_exits_2(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert _load().main(["--device", "cuda", "--out", str(tmp_path / "chk")]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
