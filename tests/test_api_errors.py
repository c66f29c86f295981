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
    ("matmul backend refuses", lambda: lmul.matmul(m, m.t(), acc="e4m3", backend="triton"), RuntimeError,
     "backend 'triton' cannot run this matmul: reduced-precision accumulation"),
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
    # issue 24: integers the compiled kernels take as int64 must not wrap, the offset rule is 0 <= c <= 1
    ("matmul acc_block 2^64+3", lambda: lmul.matmul(m, m.t(), "e4m3", acc="e4m3", acc_block=2**64 + 3), ValueError,
     "1 <= acc_block <= 2\\^63 - 1.*acc_block=18446744073709551619"),
    ("matmul acc_block 2^63", lambda: lmul.matmul(m, m.t(), acc="e4m3", acc_block=2**63), ValueError,
     "acc_block=9223372036854775808"),
    ("spec acc_block 2^64+3", lambda: lmul.LMulSpec(acc="e4m3", acc_block=2**64 + 3), ValueError, "acc_block="),
    ("mul offset above 1", lambda: lmul.mul(x, x, offset=1.5), ValueError, "0 <= offset <= 1, got offset=1.5"),
    ("mul m=0 offset not 0 or 1", lambda: lmul.mul(x, x, "e4m0", offset=0.5), ValueError,
     "not a multiple of 2\\^-0"),
]

# issue 24: layouts lmul does not take are refused by name, for every public entry and either operand
_DENSE = torch.ones(4, 4)
_LAYOUTS = {
    "sparse_coo": lambda: _DENSE.to_sparse(),
    "sparse_csr": lambda: _DENSE.to_sparse_csr(),
    "sparse_csc": lambda: _DENSE.to_sparse_csc(),
    "sparse_bsr": lambda: _DENSE.to_sparse_bsr((2, 2)),
    "sparse_bsc": lambda: _DENSE.to_sparse_bsc((2, 2)),
}
_ENTRIES = {
    "quantize": lambda t: lmul.quantize(t, "e4m3"),
    "quantize ieee": lambda t: lmul.quantize(t, "e4m3", overflow="ieee"),
    "formats.quantize": lambda t: lmul.formats.quantize(t, "e4m3"),
    "mul x": lambda t: lmul.mul(t, _DENSE),
    "mul y": lambda t: lmul.mul(_DENSE, t, backend="reference"),
    "matmul a": lambda t: lmul.matmul(t, _DENSE),
    "matmul b": lambda t: lmul.matmul(_DENSE, t, "e4m3", backend="decompose"),
    "matmul b reference": lambda t: lmul.matmul(_DENSE, t, backend="reference"),
    "LMulLinear": lambda t: lmul.LMulLinear.from_linear(torch.nn.Linear(4, 3), LMulConfig(fmt="e4m3"))(t),
}


@pytest.mark.parametrize("layout", sorted(_LAYOUTS))
@pytest.mark.parametrize("entry", sorted(_ENTRIES))
def test_sparse_layouts_are_refused_by_name(entry, layout):
    with pytest.raises(TypeError, match=f"has layout torch.{layout}; lmul takes dense"):
        _ENTRIES[entry](_LAYOUTS[layout]())


@pytest.mark.parametrize("layout", [torch.strided, torch.jagged])
@pytest.mark.parametrize("entry", sorted(_ENTRIES))
def test_nested_tensors_are_refused(entry, layout):
    nested = torch.nested.nested_tensor([torch.ones(2, 4), torch.ones(3, 4)], layout=layout)
    with pytest.raises(TypeError, match="is a nested tensor"):
        _ENTRIES[entry](nested)


def test_packed_float4_is_refused_by_dtype():
    packed = torch.zeros(4, 4, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    for entry in _ENTRIES.values():
        with pytest.raises(TypeError, match="dtype torch.float4_e2m1fn_x2"):
            entry(packed)


def test_layout_error_comes_before_any_work():
    """Bad layout with other bad arguments: the operand is named first, nothing runs."""
    with pytest.raises(TypeError, match="a has layout torch.sparse_coo"):
        lmul.matmul(_DENSE.to_sparse(), _DENSE, acc_block=2**64)


@pytest.mark.parametrize("call,error,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_call_raises_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()
