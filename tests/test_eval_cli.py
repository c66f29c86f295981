"""`lmul fetch | eval | report` argument handling: clear errors, exit status 2, no traceback."""

from __future__ import annotations

import pytest

from lmul.cli import main


@pytest.mark.parametrize("argv,msg", [
    (["eval", "--arms", "exact,foo"], "unknown arm(s) ['foo']"),
    (["eval", "--tasks", "xyz"], "unknown task or group 'xyz'"),
])
def test_eval_rejects_bad_names(argv, msg, capsys):
    assert main(argv) == 2
    assert msg in capsys.readouterr().err


def test_eval_rejects_bad_limit(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--limit", "-3"])
    assert e.value.code == 2
    assert "argument --limit: must be a positive integer or 'all'" in capsys.readouterr().err


def test_eval_without_assets_says_how(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LMUL_HOME", str(tmp_path / "empty"))
    assert main(["eval", "--no-fetch", "--limit", "1", "--out", str(tmp_path / "run")]) == 2
    assert "run `lmul fetch`" in capsys.readouterr().err


def test_report_on_a_non_run_folder(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_subcommands_registered(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "fetch" in out and "eval" in out and "report" in out and "demo" in out
