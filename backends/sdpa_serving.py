"""The sdpa family's varlen and KV-cache paths: correct fallbacks, not fast paths.

- varlen: torch.nn.attention.varlen.varlen_attn where the installed torch has the arguments the
  call needs (its signature changed from release to release: it is read, not assumed); else one
  attention per sequence (reads cu_seqlens on the host), SDPA where it serves the variant and
  explicit math (sdpa.variant_math) for softcap, sinks and the lse.
- KV cache: every sequence's cache gathered (pages through the block table) into a padded tensor
  and one attention with a per-sequence mask built on the device: no host read, capturable in a
  CUDA graph, but it copies the cache.

`sp` is the caller's Any (dispatch/serving.py): its fields are read, nothing more.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
import torch.nn.functional as F

from flashdispatch.problem import DTYPE_NAMES
from flashdispatch.reference import cache_visible_mask

from .sdpa import variant_math, windowed_sdpa


# window through a boolean mask, softcap and sinks through explicit math: the cost model predicts
# them with the plain sdpa model over the whole score matrix and its mask
FUSES_VARIANTS = False
VARIANTS_RUN_AS = "sdpa"
FALLBACK = True  # correct everywhere, fast nowhere: after the kernels that run natively


def serving_reasons(impl: Any, sp: Any, dev: Any) -> list[str]:
    """The fallback serves every packed batch and KV cache."""
    return []


def serving_notes(impl: Any, sp: Any, dev: Any) -> list[str]:
    """What explain() says of the path that runs sp."""
    if sp.kind == "varlen":
        if not torch_varlen_reasons(sp):
            return ["fallback: torch.nn.attention.varlen.varlen_attn"]
        return ["fallback: a loop over the sequences (reads cu_seqlens on the host), one SDPA call each "
                "(explicit math for softcap, sinks or lse)"]
    return ["fallback: gathers each sequence's cache (pages through block_table) into a padded tensor and "
            "runs one masked attention; no host read, capturable, but it copies the cache"]


@functools.lru_cache(maxsize=1)
def torch_varlen_params() -> frozenset[str]:
    """The keyword arguments of the installed torch.nn.attention.varlen.varlen_attn (empty: none)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:
        return frozenset()
    try:
        return frozenset(inspect.signature(varlen_attn).parameters)
    except (TypeError, ValueError):
        return frozenset()


def torch_varlen_reasons(sp: Any) -> list[str]:
    """Why torch's varlen_attn cannot serve sp (empty: it can)."""
    params = torch_varlen_params()
    if not params:
        return ["torch.nn.attention.varlen.varlen_attn is not in this torch"]
    r = []
    if sp.device_kind != "cuda":
        r.append(f"varlen_attn runs on CUDA only (device={sp.device_kind})")
    if sp.dtype not in (torch.float16, torch.bfloat16):
        r.append(f"varlen_attn takes fp16/bf16 (dtype={DTYPE_NAMES.get(sp.dtype, sp.dtype)})")
    if (sp.causal or sp.window) and "window_size" not in params and not (sp.causal and not sp.window
                                                                          and "is_causal" in params):
        r.append("this torch's varlen_attn has no window_size")
    if sp.heads_q != sp.heads_kv and "enable_gqa" not in params:
        r.append("this torch's varlen_attn has no enable_gqa")
    if sp.return_lse and "return_aux" not in params:
        r.append("this torch's varlen_attn does not return the lse")
    if sp.softcap or sp.sinks:
        r.append("varlen_attn has no softcap or sinks")
    if "scale" not in params and abs(sp.scale - sp.head_dim ** -0.5) > 1e-12 * sp.scale:
        r.append("this torch's varlen_attn has no scale argument (only 1/sqrt(D))")
    if sp.head_dim != sp.head_dim_v or sp.head_dim % 8 or sp.head_dim > 256:
        r.append(f"varlen_attn needs D == Dv, a multiple of 8, at most 256 (D={sp.head_dim}, Dv={sp.head_dim_v})")
    return r


def varlen_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                   sp: Any, sinks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (total_q, Hq, Dv), lse (Hq, total_q)); differentiable through torch's own autograd. lse is
    zeros when sp.return_lse is False (the caller drops it; a defined value keeps the custom op
    deterministic, as attention()'s op)."""
    if not torch_varlen_reasons(sp):
        return _torch_varlen(q, k, v, cu_q, cu_k, sp)
    return _varlen_loop(q, k, v, cu_q, cu_k, sp, sinks)


def kvcache_forward(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                    block_table: torch.Tensor | None, sp: Any, sinks: torch.Tensor | None,
                    out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Sq, Hq, Dv), lse (B, Hq, Sq), zeros when sp.return_lse is False); reads no device
    value on the host."""
    o, lse = _kvcache_gather(q, k_cache, v_cache, cache_seqlens, block_table, sp, sinks)
    if out is not None:
        out.copy_(o)
        o = out
    return o, lse


def _torch_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                  sp: Any) -> tuple[torch.Tensor, torch.Tensor]:
    from torch.nn.attention import varlen as tv

    params = torch_varlen_params()
    kw: dict[str, Any] = {"scale": sp.scale} if "scale" in params else {}
    if sp.heads_q != sp.heads_kv:
        kw["enable_gqa"] = True
    if "window_size" in params:
        left, right = sp.window or (-1, -1)
        kw["window_size"] = (left, 0 if sp.causal else right)
    elif sp.causal:
        kw["is_causal"] = True
    if sp.return_lse:
        res = tv.varlen_attn(q, k, v, cu_q, cu_k, sp.seqlen_q, sp.seqlen_k, return_aux=tv.AuxRequest(lse=True), **kw)
        out, lse = res[0], res[1]
        return out, lse.float()
    out = tv.varlen_attn(q, k, v, cu_q, cu_k, sp.seqlen_q, sp.seqlen_k, **kw)
    return out, torch.zeros((sp.heads_q, q.shape[0]), dtype=torch.float32, device=q.device)


def _varlen_loop(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                 sp: Any, sinks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One attention per sequence (reads cu_seqlens on the host): SDPA where it serves the
    variant, explicit math (backends/sdpa.variant_math) for softcap, sinks and the lse."""
    cq, ck = cu_q.tolist(), cu_k.tolist()
    outs, lses = [], []
    math = sp.softcap is not None or sinks is not None or sp.return_lse
    gqa = {"enable_gqa": True} if sp.heads_q != sp.heads_kv else {}
    for b in range(len(cq) - 1):
        qs, ks, vs = (t.transpose(0, 1).unsqueeze(0) for t in (q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]],
                                                               v[ck[b]:ck[b + 1]]))
        if math:
            o, lse = variant_math(qs, ks, vs, scale=sp.scale, causal=sp.causal, window=sp.window, softcap=sp.softcap,
                                  sinks=sinks)
            lses.append(lse[0])
        elif qs.shape[2] == 0:
            o = qs.new_zeros(1, sp.heads_q, 0, sp.head_dim_v)
        elif ks.shape[2] == 0:
            o = qs.new_zeros(1, sp.heads_q, qs.shape[2], sp.head_dim_v) + 0 * qs.sum()
        elif sp.causal or sp.window:
            o = windowed_sdpa(qs, ks, vs, causal=sp.causal, window=sp.window or (-1, -1),
                              kwargs={"scale": sp.scale, **gqa})
        else:
            o = F.scaled_dot_product_attention(qs, ks, vs, scale=sp.scale, **gqa)
        outs.append(o[0].transpose(0, 1))
    if not outs:
        return (q.new_zeros(q.shape[0], sp.heads_q, sp.head_dim_v),
                torch.full((sp.heads_q, q.shape[0]), float("-inf"), device=q.device))
    out = torch.cat(outs, 0)
    lse = torch.cat(lses, 1) if lses else torch.zeros((sp.heads_q, q.shape[0]), dtype=torch.float32, device=q.device)
    return out, lse


def _kvcache_gather(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                    block_table: torch.Tensor | None, sp: Any,
                    sinks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather every sequence's cache to (B, capacity, Hkv, D) and attend with a per-sequence mask
    built on the device (no host read). SDPA when it can (no softcap, sinks or lse; rows that see
    no key set to 0 after it), else explicit fp32 math."""
    bsz, sq = q.shape[0], q.shape[1]
    if block_table is not None:
        idx = block_table.long()
        k = k_cache[idx].flatten(1, 2)
        v = v_cache[idx].flatten(1, 2)
    else:
        k, v = k_cache, v_cache
    keep = cache_visible_mask(sq, k.shape[1], cache_seqlens, causal=sp.causal, window=sp.window).unsqueeze(1)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if sp.softcap is None and sinks is None and not sp.return_lse:
        g = sp.heads_q // sp.heads_kv
        kh, vh = kh.nan_to_num(), vh.nan_to_num()  # pages past a length may hold anything; masked below
        if g > 1:  # after the clean-up: it then touches Hkv heads, not Hq
            kh, vh = kh.repeat_interleave(g, 1), vh.repeat_interleave(g, 1)
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=keep, scale=sp.scale)
        o = torch.where(keep.any(-1, keepdim=True), o, torch.zeros((), dtype=o.dtype, device=o.device))
        return o.transpose(1, 2), torch.zeros((bsz, sp.heads_q, sq), dtype=torch.float32, device=q.device)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    g = sp.heads_q // sp.heads_kv
    kh, vh = kh.nan_to_num().to(acc), vh.nan_to_num().to(acc)
    if g > 1:
        kh, vh = kh.repeat_interleave(g, 1), vh.repeat_interleave(g, 1)
    s = torch.matmul(qh.to(acc), kh.transpose(-1, -2)) * sp.scale
    if sp.softcap is not None:
        s = sp.softcap * torch.tanh(s / sp.softcap)
    s = s.masked_fill(~keep, float("-inf"))
    if sinks is not None:
        s_all = torch.cat([s, sinks.to(acc).view(1, -1, 1, 1).expand(bsz, -1, sq, 1)], -1)
        lse = torch.logsumexp(s_all, -1)
    else:
        lse = torch.logsumexp(s, -1)
    w = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).unsqueeze(-1))
    o = torch.matmul(w, vh).to(q.dtype)
    return o.transpose(1, 2), lse.float()
