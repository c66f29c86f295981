"""lmul: bit-exact L-Mul (Luo & Sun, "Addition is All You Need for Energy-efficient Language
Models", arXiv:2410.00907) for PyTorch: formats, elementwise L-Mul, L-Matmul, model patching.

The numerical contract is ``docs/semantics.md``. ``import lmul`` compiles nothing and does not
import transformers or triton; those load on first use. Layers, each importing only from those
before it: ``formats`` -> ``spec`` -> ``ops`` -> ``kernels`` -> ``matmul`` / ``elementwise`` ->
``nn`` -> ``patch`` -> ``eval`` -> ``cli``.
"""

from lmul.config import LMulConfig, Placement
from lmul.elementwise import mul, quantize
from lmul.formats import BF16, E4M3, E5M2, FP16, FP32, Format
from lmul.kernels import BACKENDS, backends
from lmul.matmul import matmul
from lmul.nn import LMulLinear
from lmul.patch import inspect, patch, unpatch
from lmul.spec import MODES, PRESETS, LMulSpec, offset_exponent

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "BF16", "E4M3", "E5M2", "FP16", "FP32", "Format", "LMulConfig", "LMulLinear", "LMulSpec", "MODES",
    "PRESETS", "Placement", "backends", "inspect", "matmul", "mul", "offset_exponent", "patch", "quantize", "unpatch",
    "__version__",
]
