"""cupy backend: own FlashAttention-2 CUDA C++ kernels compiled at run time through cupy (NVRTC).

CuPy is imported lazily (inside availability() and the launch path), so importing flashdispatch
never needs it; without it the backend reports "unavailable" with the reason.

Functional entry points for torch.library custom ops: `cupy_forward`, `cupy_backward`.
"""

from __future__ import annotations

from flashdispatch.backend import Implementation

from .impl import CupyAttention
from .ops import cupy_backward, cupy_forward

IMPLEMENTATIONS: list[Implementation] = [CupyAttention()]

__all__ = ["IMPLEMENTATIONS", "CupyAttention", "cupy_backward", "cupy_forward"]
