import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", max_examples=200, deadline=None)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# No GPU: the Triton kernels run in Triton's CPU interpreter, which triton enables only when the
# variable is set before its first import (torch._dynamo imports triton when it is installed).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run with the device tool)")
