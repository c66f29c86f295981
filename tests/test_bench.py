"""lmul.bench: the timed shapes, the target column, and a short real run that writes its section."""

from __future__ import annotations

import argparse
from pathlib import Path

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


ROOT = Path(__file__).resolve().parents[1]


def _git_status() -> set[str] | None:
    import subprocess

    try:
        proc = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return set(proc.stdout.splitlines()) if proc.returncode == 0 else None


def test_a_quick_bench_leaves_the_tree_clean(monkeypatch, capsys):
    """Issue 25: `lmul bench` with default options appended a section to the committed
    benchmarks/RESULTS.md. Now the table goes to stdout only; the tracked file and `git status` do
    not change (run from the repository root, where the old relative default pointed)."""
    before = _git_status()
    if before is None:
        pytest.skip("not a git checkout")
    results = (ROOT / "benchmarks" / "RESULTS.md").read_bytes()
    monkeypatch.chdir(ROOT)
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(["--sizes", "8", "--kinds", "square", "--configs", "bf16-bit", "--reps", "1",
                         "--min-time", "0", "--naive-size", "0"])
    assert bench.main(args) == 0
    assert "| square 8 | bit | bf16 |" in capsys.readouterr().out
    assert (ROOT / "benchmarks" / "RESULTS.md").read_bytes() == results
    assert _git_status() - before == set()
    for script in ("acc", "decode", "memory"):  # the scripts that can write RESULTS.md do so only with --out
        src = (ROOT / "benchmarks" / f"{script}.py").read_text()
        assert 'default="benchmarks/RESULTS.md"' not in src and 'with_name("RESULTS.md")' not in src, script


def test_recorded_command_holds_the_given_options_only():
    """The section's command: the options the user gave, as given, not every default (the old one
    recorded `--debug False`, which is not a bench option)."""
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(["--reps", "1", "--sizes", "128", "--out", "x.md"])
    args.debug, args.func, args.command = False, None, "bench"  # what `lmul`'s own parser adds
    assert bench.command(args) == "lmul bench --sizes 128 --reps 1"
    assert bench.command(p.parse_args([])) == "lmul bench"


def test_too_short_or_noisy_measurements_get_no_verdict():
    T = bench.Timing
    ok, base = T(0.010, 0.011, 5), T(0.002, 0.0021, 5)
    assert bench.untrusted([ok, base], base) == ""
    assert bench.untrusted([T(0.6e-3, 0.6e-3, 1), T(15e-3, 15e-3, 1)], T(15e-3, 15e-3, 1)) == "1 repeat (< 3)"
    tiny = T(5e-6, 5e-6, 10)
    assert bench.untrusted([ok, tiny], tiny).startswith("baseline 5 µs")
    assert bench.untrusted([T(0.010, 0.020, 5), base], base) == "median/best 2.0 (> 1.5)"
    row = {"target": 6.0, "ratio": 0.04, "untrusted": "1 repeat (< 3)"}
    assert bench._verdict(row) == "no verdict: 1 repeat (< 3)"
    assert bench._verdict({**row, "untrusted": ""}) == "met"
    # a real run with one repeat: never a met/missed verdict
    case_list = bench.cases([16], [], [8], heads=1, kinds=("square",))
    rows = bench.run([LMulSpec.from_name("bf16-bit")], ["auto"], case_list, reps=1, naive_size=0,
                     progress=lambda s: None)
    assert rows[0]["untrusted"] and bench._verdict(rows[0]).startswith("no verdict")
