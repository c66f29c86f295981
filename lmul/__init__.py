"""lmul: bit-exact L-Mul (Luo & Sun, "Addition is All You Need for Energy-efficient Language
Models", arXiv:2410.00907) for PyTorch: formats, elementwise L-Mul, L-Matmul.

The numerical contract is ``docs/semantics.md``.
"""

from lmul.formats import BF16, E4M3, E5M2, FP16, FP32, Format, quantize
from lmul.matmul import BACKENDS, matmul
from lmul.ops import MODES, mul, offset_exponent

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "BF16", "E4M3", "E5M2", "FP16", "FP32", "Format", "MODES",
    "matmul", "mul", "offset_exponent", "quantize", "__version__",
]

# model patching (issue 6); transformers is imported only when an HF model is patched
from lmul.config import LMulConfig  # noqa: E402
from lmul.nn import LMulLinear  # noqa: E402
from lmul.patch import inspect, patch, unpatch  # noqa: E402

__all__ += ["LMulConfig", "LMulLinear", "inspect", "patch", "unpatch"]
