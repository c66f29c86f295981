"""Scale-out: the same run under torchrun with 2 CPU processes (gloo) gives the same per-item
results as one process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
from lmul.eval import store  # noqa: E402
from tests._eval_fixtures import write_fixtures  # noqa: E402

MAIN = Path(__file__).parent / "_eval_dist_main.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    data = write_fixtures(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, str(MAIN), str(one), str(data), "exact"], env=env, check=True,
                   capture_output=True, timeout=300)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(_free_port()), str(MAIN), str(two), str(data), "exact"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    names = sorted(p.name for p in (one / "parts").iterdir())
    assert names == sorted(p.name for p in (two / "parts").iterdir()) and len(names) == 4
    for name in names:
        a, b = store.read_json(one / "parts" / name), store.read_json(two / "parts" / name)
        assert (a["world_size"], b["world_size"]) == (1, 2)
        assert a["items"] == b["items"]
