"""LMulSpec: resolution, the one name vocabulary (round trips), validation of every field, and the
explicit backend table (no import-time registration)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import lmul
from lmul import kernels
from lmul.formats import BF16, E4M3, Format
from lmul.spec import PRESETS, LMulSpec, offset_exponent


def test_resolution():
    s = LMulSpec()
    assert (s.fmt, s.mode, s.offset, s.rounding, s.acc, s.acc_block, s.backend) == (BF16, "bit", 2**-4, "rne", None,
                                                                                   1, "auto")
    assert LMulSpec("E4M3", "formula") == LMulSpec(E4M3, "formula", offset=0.125)  # spellings and the default c
    assert LMulSpec(torch.bfloat16) == LMulSpec("bf16")
    assert LMulSpec(acc="fp32") == LMulSpec(acc=None) and LMulSpec(acc="e4m3").acc == E4M3
    for m, want in [(0, 0), (2, 2), (3, 3), (4, 3), (5, 4), (23, 4)]:
        assert offset_exponent(m) == want
        assert LMulSpec(Format(8, m)).offset == 2.0**-want


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_round_trip(name):
    spec = LMulSpec.from_name(name)
    assert LMulSpec.from_name(spec.name) == spec
    assert spec == LMulSpec(**PRESETS[name][0])


@given(fmt=st.sampled_from(["e4m3", "e5m2", "bf16", "fp16", "fp32", "e8m3", "e5m6", "e3m0", "e4m3ieee"]),
       mode=st.sampled_from(["bit", "formula", "exact"]), trunc=st.booleans(), k=st.integers(0, 3),
       acc=st.sampled_from([None, "e4m3", "e5m2", "bf16"]), block=st.sampled_from([1, 2, 16, 128]),
       backend=st.sampled_from(["auto", "reference", "cpu", "decompose", "torch-exact-test"]),
       backward=st.sampled_from(["exact", "same"]))
def test_names_round_trip(fmt, mode, trunc, k, acc, block, backend, backward):
    f = Format.parse(fmt)
    offset = None if mode == "exact" else k * 2.0 ** -max(f.man_bits, 1) if f.man_bits else 0.0
    spec = LMulSpec(fmt, mode, offset, "trunc" if trunc else "rne", acc, block, backend, backward)
    assert LMulSpec.from_name(spec.name) == spec, spec.name
    assert LMulSpec(**{k: v for k, v in spec.to_dict().items() if k != "name"} | {
        "offset": None if mode == "exact" else spec.offset}) == spec


def test_name_examples():
    assert LMulSpec("e8m3", rounding="trunc").name == "e8m3-bit-trunc"
    assert LMulSpec("e4m3", "exact", acc="e4m3", acc_block=16).name == "e4m3-exact-acce4m3x16"
    assert LMulSpec(offset=0.0).name == "bf16-bit-c0.0"
    assert LMulSpec.from_name("lmul-k3", acc="e4m3").name == "e8m3-bit-trunc-acce4m3"
    assert LMulSpec("e4m3", acc="e4m3", backward="same").name == "e4m3-bit-acce4m3-bwsame"


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(fmt="e9m2"), ValueError, "fmt='e9m2'"),
    (dict(fmt=3), TypeError, "fmt=3"),
    (dict(mode="fast"), ValueError, "mode='fast'"),
    (dict(mode=None), ValueError, "mode=None"),
    (dict(rounding="TRUNC"), ValueError, "rounding='TRUNC'"),
    (dict(offset="0.5"), ValueError, "offset='0.5'"),
    (dict(offset=True), ValueError, "offset=True"),
    (dict(offset=float("nan")), ValueError, "offset=nan"),
    (dict(offset=1.5), ValueError, "0 <= offset <= 1"),  # c = 1 is allowed: the default for m = 0
    (dict(offset=0.3), ValueError, "not a multiple of 2\\^-7"),
    (dict(mode="exact", offset=0.0625), ValueError, "offset=0.0625 has no effect"),
    (dict(acc="e4"), ValueError, "acc='e4'"),
    (dict(acc_block=0), ValueError, "acc_block=0"),
    (dict(acc_block=True), ValueError, "acc_block=True"),
    (dict(acc_block=2.0), ValueError, "acc_block=2.0"),
    (dict(backend=""), ValueError, "backend=''"),
    (dict(backend=None), ValueError, "backend=None"),
    (dict(backward="sam"), ValueError, "backward='sam'"),
])
def test_invalid_fields_name_themselves(kwargs, error, match):
    with pytest.raises(error, match=match):
        LMulSpec(**kwargs)


@pytest.mark.parametrize("bad", ["nope", "bf16-fast", "e4m3-", "bf16-bit-accx", "bf16-bit-c0.3"])
def test_bad_names(bad):
    with pytest.raises(ValueError):
        LMulSpec.from_name(bad)


def test_format_rejects_bools():
    for args in [(4, True), (True, 3), (4, 3, 1)]:
        with pytest.raises(ValueError):
            Format(*args)


def test_spec_or_options_not_both():
    x = torch.randn(3)
    spec = LMulSpec("e4m3")
    assert torch.equal(lmul.mul(x, x, spec=spec), lmul.mul(x, x, "e4m3"))
    assert torch.equal(lmul.mul(x, x, spec), lmul.mul(x, x, "e4m3"))
    assert torch.equal(lmul.matmul(x, x, spec=spec), lmul.matmul(x, x, "e4m3"))
    with pytest.raises(ValueError, match="pass one or the other"):
        lmul.mul(x, x, "fp16", spec=spec)
    with pytest.raises(ValueError, match="pass one or the other"):
        lmul.matmul(x, x, mode="exact", spec=spec)


def test_add_arguments_give_every_command_one_vocabulary():
    p = argparse.ArgumentParser()
    LMulSpec.add_arguments(p)
    assert LMulSpec.from_arguments(p.parse_args([])) == LMulSpec()
    ns = p.parse_args(["--spec", "lmul-k3", "--acc", "e4m3", "--acc-block", "16"])
    assert LMulSpec.from_arguments(ns) == LMulSpec("e8m3", rounding="trunc", acc="e4m3", acc_block=16)
    ns = p.parse_args(["--spec", "e4m3-formula-c0.25"])
    assert LMulSpec.from_arguments(ns).offset == 0.25
    with pytest.raises(SystemExit):
        p.parse_args(["--rounding", "up"])


# -- the backend table -----------------------------------------------------------------------

def test_table_is_explicit_and_complete():
    keys = [(b.op, b.name) for b in kernels.BACKENDS]
    assert len(keys) == len(set(keys))
    for op, order in kernels.AUTO_ORDER.items():
        assert op in kernels.OPS and isinstance(order, tuple) and order[-1] == "reference"
        assert all((op, name) in keys for name in order)
    assert {r["op"] for r in lmul.backends()} == set(kernels.OPS)


def test_importing_lmul_writes_no_tables_of_lower_modules():
    """No module registers into another's tables at import; nothing is compiled, no triton, no
    transformers (checked in a fresh interpreter)."""
    code = ("import sys, lmul, lmul.formats, lmul.ops\n"
            "assert not hasattr(lmul.formats, 'QUANTIZERS') and not hasattr(lmul.ops, 'MUL_KERNELS')\n"
            "from lmul.kernels import cpu_ext\n"
            "assert cpu_ext._LIB is None\n"
            "assert 'transformers' not in sys.modules and 'triton' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_named_backends_are_selectable_for_every_op():
    x = torch.randn(300, 300)
    spec = LMulSpec("e4m3", "formula")
    want = lmul.mul(x, x.t(), spec=spec.replace(backend="reference"))
    assert torch.equal(lmul.mul(x, x.t(), spec=spec, backend="reference"), want)
    if kernels.get("mul", "cpu").unavailable(x, spec) is None:
        got = lmul.mul(x, x.t(), spec=spec, backend="cpu")
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))
        assert torch.equal(lmul.quantize(x, "e4m3", backend="cpu"), lmul.quantize(x, "e4m3", backend="reference"))
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        lmul.mul(x, x, backend="nope")
    # a matmul-only backend name means auto for the elementwise ops (patch(..., backend="decompose"))
    assert torch.equal(lmul.mul(x, x, "e4m3", backend="decompose"), lmul.mul(x, x, "e4m3"))
