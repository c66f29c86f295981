"""lmul: bit-exact L-Mul (Luo & Sun, "Addition is All You Need for Energy-efficient Language
Models", arXiv:2410.00907) for PyTorch: formats, elementwise L-Mul, L-Matmul, model patching.

The numerical contract is ``docs/semantics.md``. ``import lmul`` compiles nothing and does not
import transformers or triton; those load on first use.
"""

from lmul.config import LMulConfig
from lmul.formats import BF16, E4M3, E5M2, FP16, FP32, Format, quantize
from lmul.kernels import backends  # registers the fast backends (nothing compiled at import)
from lmul.matmul import BACKENDS, matmul
from lmul.nn import LMulLinear
from lmul.ops import MODES, mul, offset_exponent
from lmul.patch import inspect, patch, unpatch

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "BF16", "E4M3", "E5M2", "FP16", "FP32", "Format", "LMulConfig", "LMulLinear", "MODES",
    "backends", "inspect", "matmul", "mul", "offset_exponent", "patch", "quantize", "unpatch", "__version__",
]
