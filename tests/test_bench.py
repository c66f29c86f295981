"""lmul.bench: the timed shapes, the target column, and a short real run that writes its section."""

from __future__ import annotations

import argparse

import pytest
import torch

from lmul import bench
from lmul.spec import LMulSpec


def test_cases_shapes_and_kinds():
    got = bench.cases([16], [32], [8], heads=3, decode_lens=[40])
    shapes = {c.name: (c.batch, c.m, c.k, c.n, c.targeted) for c in got}
    assert shapes == {
        "square 16": (0, 16, 16, 16, True),
        "attn QK^T bh=3 s=32 d=8": (3, 32, 8, 32, True),
        "attn PV bh=3 s=32 d=8": (3, 32, 32, 8, True),
        "decode QK^T bh=3 t=40 d=8": (3, 1, 8, 40, False),
        "decode PV bh=3 t=40 d=8": (3, 1, 40, 8, False),
    }
    only = bench.cases([16], [32], [8], heads=3, decode_lens=[40], kinds=("decode",))
    assert [c.name for c in only] == ["decode QK^T bh=3 t=40 d=8", "decode PV bh=3 t=40 d=8"]
    a, b = only[1].operands("cpu")
    assert a.shape == (3, 1, 40) and b.shape == (3, 40, 8)


def test_run_rows_and_targets(tmp_path):
    case_list = bench.cases([8], [], [8], heads=2, decode_lens=[16], kinds=("square", "decode"))
    spec = LMulSpec.from_name("bf16-bit")
    rows = bench.run([spec], ["auto"], case_list, reps=1, naive_size=0, progress=lambda s: None)
    by_case = {r["case"]: r for r in rows}
    assert by_case["square 8"]["target"] == bench.TARGETS["bf16-bit"]
    for name in ("decode QK^T bh=2 t=16 d=8", "decode PV bh=2 t=16 d=8"):
        row = by_case[name]
        assert row["target"] is None and bench._verdict(row) == ""
        assert row["ratio"] == pytest.approx(row["time_ms"] / row["native_ms"])
        assert row["tflops"] == pytest.approx(2 * 2 * 1 * 8 * 16 / (row["time_ms"] / 1e3) / 1e12)
    out = tmp_path / "R.md"
    bench.write_results(rows, out, "lmul bench --kinds square,decode", "cpu", key="t")
    text = out.read_text()
    assert "decode PV bh=2 t=16 d=8" in text and "lmul-bench:t:start" in text


def test_kinds_argument():
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    assert p.parse_args(["--kinds", "decode, square"]).kinds == "decode,square"
    with pytest.raises(SystemExit):
        p.parse_args(["--kinds", "decoder"])


def test_decode_benchmark_script(tmp_path):
    """benchmarks/decode.py on a tiny cache: one row per (T, arm), the section written."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "decode.py"
    spec = importlib.util.spec_from_file_location("decode_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "R.md"
    assert mod.main(["--batch", "2", "--heads", "4", "--kv-heads", "2", "--head-dim", "8", "--lens", "5,9",
                     "--arms", "lmul,e4m3", "--reps", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert "lmul-bench:decode:start" in text
    rows = [r for r in text.splitlines() if r.startswith("| 5 |") or r.startswith("| 9 |")]
    assert [r.split(" | ")[1] for r in rows] == ["lmul", "e4m3", "lmul", "e4m3"]
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    want = torch.softmax(q @ mod.repeat_kv(k, 2).transpose(2, 3) / 8**0.5, -1) @ mod.repeat_kv(v, 2)
    torch.testing.assert_close(mod.eager_attention(q, k, v, torch.zeros(2, 1, 1, 5)), want)
