"""Bad calls of the public functions: each raises one clear error naming the argument (issue #17's
API cases and their neighbours). Table-driven: (call, exception, message pattern)."""

from __future__ import annotations

import pytest
import torch

import lmul
from lmul import Format, LMulConfig

x = torch.ones(3)
m = torch.ones(2, 3)

CASES = [
    ("mul rounding TRUNC", lambda: lmul.mul(x, x, rounding="TRUNC"), ValueError, "rounding='TRUNC'"),
    ("mul rounding None", lambda: lmul.mul(x, x, rounding=None), ValueError, "rounding=None"),
    ("mul offset string", lambda: lmul.mul(x, x, offset="0.5"), ValueError, "offset='0.5'"),
    ("mul offset bool", lambda: lmul.mul(x, x, offset=True), ValueError, "offset=True"),
    ("mul offset exact", lambda: lmul.mul(x, x, mode="exact", offset=0.5), ValueError, "no effect with mode='exact'"),
    ("mul unknown mode", lambda: lmul.mul(x, x, mode="fast"), ValueError, "mode='fast'"),
    ("mul unknown format", lambda: lmul.mul(x, x, fmt="e9m9"), ValueError, "fmt='e9m9'"),
    ("mul format int", lambda: lmul.mul(x, x, fmt=8), TypeError, "fmt=8"),
    ("mul int dtype", lambda: lmul.mul(x.int(), x), TypeError, "x must have a floating dtype"),
    ("mul not a tensor", lambda: lmul.mul([1.0], x), TypeError, "x must be a torch.Tensor"),
    ("mul shapes", lambda: lmul.mul(torch.ones(3), torch.ones(4)), ValueError, "do not broadcast"),
    ("mul meta", lambda: lmul.mul(x.to("meta"), x.to("meta")), ValueError, "'meta' device"),
    ("mul mixed devices", lambda: lmul.mul(x, x.to("meta")), ValueError, "different devices"),
    ("mul unknown backend", lambda: lmul.mul(x, x, backend="nope"), ValueError, "unknown backend 'nope'"),
    ("matmul acc_block bool", lambda: lmul.matmul(m, m.t(), acc="e4m3", acc_block=True), ValueError,
     "acc_block=True"),
    ("matmul acc_block 0", lambda: lmul.matmul(m, m.t(), acc_block=0), ValueError, "acc_block=0"),
    ("matmul acc_block float", lambda: lmul.matmul(m, m.t(), acc_block=1.5), ValueError, "acc_block=1.5"),
    ("matmul acc unknown", lambda: lmul.matmul(m, m.t(), acc="e4"), ValueError, "acc='e4'"),
    ("matmul rounding", lambda: lmul.matmul(m, m.t(), rounding="up"), ValueError, "rounding='up'"),
    ("matmul inner dims", lambda: lmul.matmul(m, m), ValueError, "do not match"),
    ("matmul scalar", lambda: lmul.matmul(torch.tensor(1.0), x), ValueError, "at least 1 dimension"),
    ("matmul batch", lambda: lmul.matmul(torch.ones(2, 2, 3), torch.ones(3, 3, 1)), ValueError, "do not broadcast"),
    ("matmul meta", lambda: lmul.matmul(m.to("meta"), m.t().to("meta")), ValueError, "'meta' device"),
    ("matmul backend refuses", lambda: lmul.matmul(m, m.t(), acc="e4m3", backend="cpu"), RuntimeError,
     "backend 'cpu' cannot run"),
    ("matmul backend mode", lambda: lmul.matmul(m, m.t(), "bf16", "bit", backend="decompose"), RuntimeError,
     "backend 'decompose' cannot run this matmul: bit mode needs m <= 4"),
    ("matmul spec and options", lambda: lmul.matmul(m, m.t(), "e4m3", spec=lmul.LMulSpec()), ValueError,
     "pass one or the other"),
    ("matmul spec type", lambda: lmul.matmul(m, m.t(), spec="bf16-bit"), TypeError, "spec must be an LMulSpec"),
    ("quantize rounding", lambda: lmul.quantize(x, "e4m3", rounding="TRUNC"), ValueError, "rounding='TRUNC'"),
    ("quantize overflow", lambda: lmul.quantize(x, "e4m3", overflow="wrap"), ValueError, "overflow='wrap'"),
    ("Format exp bool", lambda: Format(True, 3), ValueError, "exp_bits=True"),
    ("Format finite_only int", lambda: Format(4, 3, 1), ValueError, "finite_only=1"),
    ("Format(4, True)", lambda: Format(4, True), ValueError, "man_bits=True"),
    ("Format range", lambda: Format(9, 3), ValueError, "exp_bits must be an int in 1..8"),
    ("config unknown option", lambda: LMulConfig(fmat="e4m3"), TypeError, "unknown options \\['fmat'\\]"),
    ("config scope", lambda: LMulConfig(scope="mlp"), ValueError, "scope='mlp'"),
    ("spec unknown name", lambda: lmul.LMulSpec.from_name("lmul-k9"), ValueError, "unknown spec 'lmul-k9'"),
    ("patch not a module", lambda: lmul.patch(object(), "lmul"), TypeError, "needs a torch.nn.Module"),
]


@pytest.mark.parametrize("call,error,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_call_raises_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()
