"""sdpa:cudnn's forward/backward pair with lse, through torch's private cuDNN attention ops.

The public SDPA call returns no lse and its backward recomputes its own, so a caller that merges
blocks by their lse (ring attention) cannot use it. torch's private ops can: the forward returns
the lse, and the backward takes a given out and lse (the whole row's). These are the kernels plain
SDPA runs on an H100. They are private (their lse shape and argument list may change between
torch releases), so callers check them against the math before use (the ring does, once per
device and dtype: flashdispatch.distributed.aten_cudnn). MHA only (Hq == Hkv), fp16/bf16, bhsd.

`SdpaCudnn.lse_pair()` hands this pair out; it is not registered for selection: eager and compiled
calls of `sdpa:cudnn` keep running the public SDPA call, differentiated by torch.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from flashdispatch.backend import Capabilities, Gradients, Implementation, Inputs
from flashdispatch.device import DeviceInfo
from flashdispatch.problem import Problem

_rng_words: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse (B, H, Sq) float32) of one block; bhsd-indexed, Hq == Hkv, square when causal."""
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(
        _dense(q), _dense(k), _dense(v), None, True, 0.0, causal, False, scale=scale
    )
    out, lse = res[0], res[1]
    # dropout is 0: the rng words are never read, but the backward op takes tensors of their kind
    _rng_words.setdefault(q.device, (res[6], res[7]))
    return out, lse.reshape(q.shape[0], q.shape[1], q.shape[2]).float()


def backward(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    *, causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block's (dq, dk, dv) against the given (global) out and lse."""
    seed, offset = _rng_words[q.device]
    b, h, sq, _ = q.shape
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        _dense(do), _dense(q), _dense(k), _dense(v), _dense(out),
        _dense(lse).reshape(b, h, sq, 1), seed, offset, None, None, None, sq, k.shape[2], 0.0, causal,
        scale=scale,
    )
    return dq, dk, dv


class CudnnLsePair(Implementation):
    """The pair as an Implementation (forward with lse, backward from a given out and lse)."""

    name: ClassVar[str] = "sdpa:cudnn"
    backend: ClassVar[str] = "sdpa"

    def capabilities(self, dev: DeviceInfo) -> Capabilities:
        return Capabilities(device_kinds=frozenset({"cuda"}), dtypes=frozenset({torch.float16, torch.bfloat16}),
                            min_cuda_capability=80, max_head_dim=128, head_dim_multiple=8,
                            different_v_head_dim=False, gqa=False, lse=True, deterministic=False)

    def forward(self, inp: Inputs, p: Problem, config: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return forward(inp.q, inp.k, inp.v, causal=p.causal, scale=p.scale)

    def backward(self, inp: Inputs, out: torch.Tensor, lse: torch.Tensor, do: torch.Tensor, p: Problem,
                 config: dict[str, Any]) -> Gradients:
        return Gradients(*backward(do, inp.q, inp.k, inp.v, out, lse, causal=p.causal, scale=p.scale))


LSE_PAIR = CudnnLsePair()
