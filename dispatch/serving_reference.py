"""Packed (varlen) and KV-cache attention written out per sequence over the dense reference.

The float64 references of `attention_varlen` and `attention_kvcache` (upcast=True) and the
same-dtype baselines that set the error budget (upcast=False): each sequence is cut out of the
packed tensors, or gathered out of the (paged) cache, and handed to `reference.attention_math`, so
the masking rules (bottom-right causal, window, softcap, sinks, GQA) have one definition.
"""

from __future__ import annotations

import torch

from .reference import attention_math


def _bounds(cu: torch.Tensor) -> list[int]:
    return [int(x) for x in cu.tolist()]


def varlen_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                cu_seqlens_k: torch.Tensor, *, causal: bool = False, scale: float | None = None,
                upcast: bool = True, window: tuple[int, int] | None = None, softcap: float | None = None,
                sinks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (total_q, Hq, Dv), lse (Hq, total_q)) of packed q (total_q, Hq, D), k, v (total_k, Hkv, *).

    Differentiable when the inputs require grad (the slices are views)."""
    cq, ck = _bounds(cu_seqlens_q), _bounds(cu_seqlens_k)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs, lses = [], []
    for b in range(len(cq) - 1):
        qs, ks, vs = q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]]
        o, lse = attention_math(qs.unsqueeze(0), ks.unsqueeze(0), vs.unsqueeze(0), causal=causal, scale=scale,
                                layout="bshd", upcast=upcast, window=window, softcap=softcap, sinks=sinks)
        outs.append(o[0])
        lses.append(lse[0])
    dt = torch.float64 if upcast else q.dtype
    if not outs:
        return (q.new_zeros((0, q.shape[1], v.shape[2]), dtype=dt),
                torch.zeros((q.shape[1], 0), dtype=torch.float64 if upcast else torch.float32))
    return torch.cat(outs, 0), torch.cat(lses, 1)


def gather_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                 block_table: torch.Tensor | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each sequence's (k, v) as (L_b, Hkv, D) tensors, out of a contiguous or paged cache."""
    lens = [int(x) for x in cache_seqlens.tolist()]
    seqs = []
    for b, n in enumerate(lens):
        if block_table is None:
            seqs.append((k_cache[b, :n], v_cache[b, :n]))
        else:
            page = k_cache.shape[1]
            blocks = block_table[b, :(n + page - 1) // page].long()
            seqs.append((k_cache[blocks].flatten(0, 1)[:n], v_cache[blocks].flatten(0, 1)[:n]))
    return seqs


def kvcache_math(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                 block_table: torch.Tensor | None = None, *, causal: bool = True, scale: float | None = None,
                 upcast: bool = True, window: tuple[int, int] | None = None, softcap: float | None = None,
                 sinks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Sq, Hq, Dv), lse (B, Hq, Sq)) of q (B, Sq, Hq, D) against each sequence's cache."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs, lses = [], []
    for b, (ks, vs) in enumerate(gather_cache(k_cache, v_cache, cache_seqlens, block_table)):
        o, lse = attention_math(q[b:b + 1], ks.unsqueeze(0), vs.unsqueeze(0), causal=causal, scale=scale,
                                layout="bshd", upcast=upcast, window=window, softcap=softcap, sinks=sinks)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, 0), torch.cat(lses, 0)
