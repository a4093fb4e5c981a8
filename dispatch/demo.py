"""`flashdispatch demo`: a small transformer through flashdispatch.attention on the present device.

A two-layer pre-norm decoder block with GQA runs a training step (forward + backward, causal prefill)
and a few KV-cache decode steps. For each distinct attention call it prints the decision, then the
error of outputs and gradients against the same model in float64 with reference attention (next to
plain PyTorch's own error in the same dtype), and the time against the same model calling
F.scaled_dot_product_attention directly.
"""

from __future__ import annotations

import copy
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .api import attention, explain
from .reference import attention_math, causal_mask

AttnFn = Callable[..., torch.Tensor]


def fd_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    return attention(q, k, v, causal=causal)  # type: ignore[return-value]


def fd_attn_traced(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """fd_attn that prints, for every call, what ran and why (one line; explain() is a cached lookup)."""
    d = explain(q, k, v, causal=causal)
    p = d.problem
    print(f"  call: Sq={p.seqlen_q:<5} Sk={p.seqlen_k:<5} grad={str(p.needs_grad):<5} -> {d.variant:<11} "
          f"source: {d.source.split('#')[0] if d.source.startswith('profile') else d.source}")
    return fd_attn(q, k, v, causal)


def sdpa_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    sq, sk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if causal and sq > 1 and sq != sk:
        mask = causal_mask(sq, sk, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal and sq > 1, enable_gqa=gqa)


def ref_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    return attention_math(q, k, v, causal=causal)[0].to(q.dtype)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.hd, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, attn: AttnFn, cache: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        h = self.norm1(x)
        q = self.q(h).view(b, s, self.heads, self.hd).transpose(1, 2)
        k, v = self.kv(h).view(b, s, 2, self.kv_heads, self.hd).permute(2, 0, 3, 1, 4)
        if cache is not None:
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        a = attn(q, k, v, causal=True).transpose(1, 2).reshape(b, s, -1)
        x = x + self.o(a)
        return x + self.mlp(self.norm2(x))


class TinyModel(nn.Module):
    def __init__(self, dim: int = 256, heads: int = 8, kv_heads: int = 2, layers: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads) for _ in range(layers))

    def forward(self, x: torch.Tensor, attn: AttnFn, caches: list[dict[str, torch.Tensor]] | None = None) -> torch.Tensor:
        for i, blk in enumerate(self.blocks):
            x = blk(x, attn, caches[i] if caches is not None else None)
        return x


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms_pair(a: Callable[[], object], b: Callable[[], object], device: torch.device,
                    reps: int = 15) -> tuple[float, float]:
    """Median wall time of a and b, interleaved so that clock ramps and noise hit both alike."""
    for _ in range(3):
        a()
        b()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(reps):
        for fn, acc in ((a, times[0]), (b, times[1])):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            acc.append((time.perf_counter() - t0) * 1e3)
    return tuple(sorted(t)[len(t) // 2] for t in times)  # type: ignore[return-value]


def _train_step(model: TinyModel, x: torch.Tensor, attn: AttnFn) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_(True)
    y = model(xi, attn)
    y.float().pow(2).mean().backward()
    grads = [xi.grad] + [p.grad for p in model.parameters()]
    return y.detach(), grads  # type: ignore[return-value]


def run_demo(device: str | None = None, steps: int = 3, seqlen: int | None = None) -> int:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    s = seqlen or (2048 if dev.type == "cuda" else 128)
    b = 2
    torch.manual_seed(0)
    model64 = TinyModel().double().to(dev)
    model = copy.deepcopy(model64).to(dtype)
    x = torch.randn(b, s, 256, device=dev, dtype=torch.float64)
    print(f"flashdispatch demo on {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU'}), "
          f"dtype {str(dtype).replace('torch.', '')}, batch {b}, prompt {s}, 2 layers, 8 q heads / 2 kv heads, D=32\n")

    # -- the decisions, one per distinct call shape
    hd = 32
    calls = [("training prefill (fwd+bwd)", (b, 8, 2, s, s, hd), True),
             ("decode step against the KV cache", (b, 8, 2, 1, s + 1, hd), False)]
    for label, (bb, hq, hkv, sq, sk, d_), grad in calls:
        q = torch.empty(bb, hq, sq, d_, device=dev, dtype=dtype)
        kv = torch.empty(bb, hkv, sk, d_, device=dev, dtype=dtype)
        d = explain(q, kv, kv, causal=True, needs_grad=grad)
        print(f"[{label}]\n{d}\n")

    # -- accuracy: training step vs float64 reference, next to plain torch in the same dtype
    y_ref, g_ref = _train_step(model64, x, ref_attn)
    print("every flashdispatch call of one training step and one prefill + decode pass:")
    y_fd, g_fd = _train_step(model, x.to(dtype), fd_attn_traced)
    y_pt, g_pt = _train_step(model, x.to(dtype), sdpa_attn)

    def err(a: torch.Tensor, r: torch.Tensor) -> float:
        return float((a.double() - r).abs().max() / r.abs().max().clamp_min(1e-30))

    e_out = (err(y_fd, y_ref), err(y_pt, y_ref))
    e_grad = (max(err(a, r) for a, r in zip(g_fd, g_ref)), max(err(a, r) for a, r in zip(g_pt, g_ref)))

    # -- decode: prefill the cache, then single-token steps
    def decode(attn: AttnFn) -> torch.Tensor:
        caches: list[dict[str, torch.Tensor]] = [{} for _ in model.blocks]
        with torch.no_grad():
            h = model(x[:, :-steps].to(dtype), attn, caches)
            for t in range(steps):
                h = model(x[:, s - steps + t : s - steps + t + 1].to(dtype), attn, caches)
        return h

    dec_fd, dec_pt = decode(fd_attn_traced), decode(sdpa_attn)
    print()
    e_dec = float((dec_fd.double() - dec_pt.double()).abs().max())

    # -- time: the whole training step and the decode loop, flashdispatch vs plain SDPA
    t_train = _median_ms_pair(lambda: _train_step(model, x.to(dtype), fd_attn),
                              lambda: _train_step(model, x.to(dtype), sdpa_attn), dev)
    t_dec = _median_ms_pair(lambda: decode(fd_attn), lambda: decode(sdpa_attn), dev)

    print("                         flashdispatch   plain SDPA")
    print(f"max rel err, output      {e_out[0]:13.2e}   {e_out[1]:10.2e}   (vs float64 reference)")
    print(f"max rel err, gradients   {e_grad[0]:13.2e}   {e_grad[1]:10.2e}")
    print(f"decode, |fd - sdpa|      {e_dec:13.2e}")
    print(f"train step (ms)          {t_train[0]:13.3f}   {t_train[1]:10.3f}   ratio {t_train[1] / t_train[0]:.2f}x")
    print(f"prefill+{steps} decode (ms)   {t_dec[0]:13.3f}   {t_dec[1]:10.3f}   ratio {t_dec[1] / t_dec[0]:.2f}x")
    ok = e_out[0] <= 2 * e_out[1] + 1e-3 and e_grad[0] <= 3 * e_grad[1] + 1e-3
    print("accuracy:", "OK (within flash-attention's 2x/3x budget of plain PyTorch)" if ok else "FAILED")
    return 0 if ok else 1
