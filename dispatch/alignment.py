"""16-byte alignment of the tensors handed to fused kernels (torch's and ours load 16-byte vectors)."""

from __future__ import annotations

import torch


def aligned16(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when its base and row strides are 16-byte multiples with a unit last stride,
    else a dense copy (whose rows are 16-byte multiples when the last dim's bytes are).

    Why: a misaligned view (a slice starting at an odd column, or a flat view at an odd offset)
    makes torch's efficient kernel and our cp.async loads fault with "misaligned address" instead
    of declining (seen on H100, torch 2.11), which poisons the CUDA context. A copy costs far less.
    """
    if not t.data_ptr() & 15 and t.is_contiguous():
        return t  # the common case; a copy would have this very layout
    size = t.element_size()
    # clone, not contiguous(): a contiguous view at an odd address would come back as itself
    if t.data_ptr() & 15 or t.stride(-1) != 1:
        return t.clone(memory_format=torch.contiguous_format)
    if not (t.shape[-1] * size) & 15 and any(
            (st * size) & 15 for st, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1):
        return t.clone(memory_format=torch.contiguous_format)  # its rows will be 16-byte multiples
    return t
