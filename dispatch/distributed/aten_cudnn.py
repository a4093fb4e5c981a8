"""Ring blocks through sdpa:cudnn's forward/backward pair with lse (torch's private cuDNN attention
ops, backends/sdpa_cudnn.py, taken from the registry): the kernels plain SDPA runs on an H100, with
the lse the ring needs. This module holds the ring's policy for them: when to use them, and the
self-check against the math before first use.

The ring uses them where the dispatcher chose SDPA for the rank's local problem (sdpa's public call
returns no lse; `blocks_reason` says when and why not). These aten ops are private (their lse shape
and argument list may change between torch releases), so every device and dtype first passes
`self_check` against the torch-ops math, once per process. MHA only (Hq == Hkv), fp16/bf16, on
sm90 only (where it was measured), with cuDNN SDPA enabled and torch's own cuDNN gate passing on
every block shape.

A cuDNN call that raises during a ring is not caught: the ring does not switch kernels mid-run,
and the exception leaves that rank (its peers then wait in the transfers until the process group's
timeout). The gates above are there to make that case not happen.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Sequence

import torch

from ..backend import Implementation, Inputs
from ..problem import Problem, problem_from_tensors
from ..reference import attention_math
from ..registry import REGISTRY
from .block_backward import Grads, block_backward_math, softmax_delta
from .layout import Block

log = logging.getLogger("flashdispatch.distributed")

def _pair() -> Implementation:
    pair = REGISTRY.get("sdpa:cudnn").lse_pair()
    if pair is None:
        raise RuntimeError("sdpa:cudnn offers no forward/backward pair with lse")
    return pair


def _problem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float) -> Problem:
    return problem_from_tensors(q, k, v, causal=causal, scale=scale, layout="bhsd", return_lse=True)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse (B, H, Sq) float32) of one block through sdpa:cudnn's pair; bhsd-indexed, Hq == Hkv,
    square when causal."""
    out, lse = _pair().forward(Inputs(q, k, v), _problem(q, k, v, causal, scale), {})
    return out, lse


def backward(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    *, causal: bool, scale: float,
) -> Grads:
    """One block's (dq, dk, dv) against the given (global) out and lse, through sdpa:cudnn's pair."""
    g = _pair().backward(Inputs(q, k, v), out, lse, do, _problem(q, k, v, causal, scale), {})
    return g.dq, g.dk, g.dv


def self_check(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> str | None:
    """None when forward lse and the backward-with-given-lse agree with the torch-ops math on a
    split block (so the lse is the natural-log whole-row one), else the reason."""
    try:
        g = torch.Generator(device=device).manual_seed(3)
        b, h, s, d = 1, 2, 256, 64
        q, k, v, do = (torch.randn(b, h, s, d, generator=g, device=device, dtype=dtype) for _ in range(4))
        scale = d ** -0.5
        out, lse = forward(q, k, v, causal=True, scale=scale)
        _, ref_lse = attention_math(q, k, v, causal=True, scale=scale)  # the float64 reference
        lse_err = float((lse.double() - ref_lse).abs().max())
        if not lse_err < 1e-2:
            return f"forward lse differs from the natural-log logsumexp by {lse_err:.3g}"
        # rows [s/2:s) against keys [0:s/2): a full block inside causal rows, global out/lse
        rows, cols = slice(s // 2, s), slice(0, s // 2)
        args = (do[:, :, rows], q[:, :, rows], k[:, :, cols], v[:, :, cols])
        got = backward(*args, out[:, :, rows], lse[:, :, rows], causal=False, scale=scale)
        want = block_backward_math(*args, lse[:, :, rows], softmax_delta(do, out)[:, :, rows], causal=False,
                                   scale=scale)
        for name, a, w in zip(("dq", "dk", "dv"), got, want):
            rel = float((a.float() - w.float()).norm() / w.float().norm())
            if not rel < 2e-2:
                return f"backward {name} with a given lse differs from the math by {rel:.3g} (relative)"
    except Exception as e:  # private ops: any failure means "not usable here"
        return f"{type(e).__name__}: {e}"
    return None


SDPA_VARIANTS = frozenset({"sdpa", "sdpa:cudnn"})


@functools.lru_cache(maxsize=None)
def _checked(device: torch.device, dtype: torch.dtype) -> str | None:
    why = self_check(device, dtype)
    if why:
        log.info("ring: cuDNN blocks unusable on %s %s: %s", device, dtype, why)
    return why


def device_reason(device: torch.device) -> str | None:
    """None when `device` is where the cuDNN ring blocks are allowed at all, else why not: a CUDA
    device of compute capability 9.x (sm90: the H100 is the only place this path was measured, and
    the speed it exists for is cuDNN's there), with cuDNN SDPA enabled in torch (a user who turned
    it off with torch.backends.cuda.enable_cudnn_sdp(False) does not want these kernels)."""
    if device.type != "cuda":
        return f"device {device.type}: cuDNN blocks need CUDA"
    if not torch.backends.cuda.cudnn_sdp_enabled():
        return "cuDNN SDPA is disabled in torch (torch.backends.cuda.cudnn_sdp_enabled() is False)"
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return f"cuDNN ring blocks measured only on sm90 (H100); this device is sm{major}{minor}"
    return None


def sdpa_block_reason(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: Sequence[Block] | None = None
) -> str | None:
    """None when torch's own SDPA dispatch would run cuDNN on every distinct block shape of the
    ring (`torch.backends.cuda.can_use_cudnn_attention`), else why not. blocks None: the whole local
    problem as one unmasked block.

    Torch's gate covers what the ring's own checks do not: the cuDNN build and version, its limits on
    sequence lengths (a block of one key, which a causal local slice of 2 rows gives), deterministic
    mode. It is a host-side check of shapes, strides and flags, cheap enough for every call. The
    blocks are views of the local slices; the private ops get them made contiguous, and torch's
    gate asks of strides only a unit last one, which both have."""
    can_use = getattr(torch.backends.cuda, "can_use_cudnn_attention", None)
    params_type = getattr(torch.backends.cuda, "SDPAParams", None)
    if can_use is None or params_type is None:
        # an older or newer torch without the gate: the self-check still guards the private ops
        return None
    if blocks is None:
        blocks = [Block(0, slice(0, q.shape[2]), slice(0, k.shape[2]), False)]
    seen: set[tuple[int, int, bool]] = set()
    # the gate reads the current device's properties: ask it about the tensors' device
    on_device = torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext()
    for blk in blocks:
        qs, ks, vs = q[:, :, blk.q_rows], k[:, :, blk.kv_rows], v[:, :, blk.kv_rows]
        key = (qs.shape[2], ks.shape[2], blk.causal)
        if key in seen:
            continue
        seen.add(key)
        try:
            with on_device:
                ok = can_use(params_type(qs, ks, vs, None, 0.0, blk.causal, False), False)
        except Exception as e:  # a changed SDPAParams signature, say: no claim that cuDNN can run
            return f"torch.backends.cuda.can_use_cudnn_attention failed: {type(e).__name__}: {e}"
        if not ok:
            # not asked again with debug=True: torch 2.11 writes that reason to stderr from C++ (no
            # Python warning to capture), and would on every call
            return (f"torch's SDPA would not run cuDNN on block {blk.describe()} (Sq={qs.shape[2]}, "
                    f"Sk={ks.shape[2]}): torch.backends.cuda.can_use_cudnn_attention is False; its "
                    f"debug=True says why")
    return None


def device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def blocks_reason(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chosen: str | None, blocks: Sequence[Block] | None = None
) -> str | None:
    """None when the ring should run its blocks through these ops, else why not.

    q, k, v: the rank's local slices (bhsd-indexed). chosen: the variant the dispatcher picks for
    the local problem (or the forced backend). SDPA chosen means its kernels are the fastest here;
    the ring needs each block's lse, which only this private path gives for cuDNN. blocks: the
    ring's blocks on this rank, each checked against torch's own cuDNN gate (None: the whole local
    problem as one block).

    The checks of the problem itself (dtype, GQA, head dims) come before those of the device, so
    that the reason names what no device would change."""
    if chosen not in SDPA_VARIANTS:
        return f"the dispatcher chose {chosen} for the local problem"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype}: cuDNN blocks take fp16/bf16"
    if q.shape[1] != k.shape[1]:
        return f"GQA (Hq={q.shape[1]}, Hkv={k.shape[1]}): the private op path is MHA only"
    d, dv = q.shape[3], v.shape[3]
    if d != dv or d % 8 or d > 128:
        return f"head dims D={d}, Dv={dv}: cuDNN blocks take D == Dv, a multiple of 8, at most 128"
    why = device_reason(q.device)
    if why:
        return why
    why = sdpa_block_reason(q, k, v, blocks)
    if why:
        return why
    return _checked(torch.device("cuda", device_index(q.device)), q.dtype)
