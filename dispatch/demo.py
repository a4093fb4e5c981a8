"""`flashdispatch demo`: what flashdispatch is for, on a small decoder.

A two-layer decoder (head dim 128, the size the shipped profiles measure) goes through the calls a
model makes: a training step (causal forward + backward), a prefill, a chunked prefill (a chunk of
new tokens against the KV cache), speculative verification (a few draft tokens against the cache)
and decode steps. For every kind of call it prints what flashdispatch chose and why (the decision's
source: a measured profile entry, or the built-in default), the attention time next to plain
PyTorch SDPA (medians of interleaved repetitions with their interquartile range; a ratio only where
the two differ beyond that spread), and the error against a float64 reference next to plain
SDPA's own. On a CPU it runs SDPA (our kernels are for GPUs) and also shows, for a simulated
H100, what each GPU-sized call would run.
"""

from __future__ import annotations

import copy
from typing import Callable, NamedTuple

import torch
import torch.nn as nn

from .api import attention, explain
from .reference import attention_math
from .tolerances import within_budget

AttnFn = Callable[..., torch.Tensor]
HEAD_DIM = 128  # the head dim of the shipped profiles' measured entries
MIN_SEQLEN = 64


def fd_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    return attention(q, k, v, causal=causal)  # type: ignore[return-value]


def sdpa_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """What a PyTorch user writes today (bottom-right causal for a query block against a cache)."""
    from flashdispatch.tools.bench import plain_sdpa

    return plain_sdpa(q, k, v, causal)


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


class TinyDecoder(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, layers: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads) for _ in range(layers))

    def forward(self, x: torch.Tensor, attn: AttnFn, caches: list[dict[str, torch.Tensor]] | None = None) -> torch.Tensor:
        for i, blk in enumerate(self.blocks):
            x = blk(x, attn, caches[i] if caches is not None else None)
        return x


class Step(NamedTuple):
    label: str
    sq: int  # new query rows of the call
    sk: int  # keys it attends to (the cache after the call's own tokens)
    grad: bool


def plan_steps(seqlen: int, chunk: int, draft: int, train_len: int, decode_steps: int) -> list[Step]:
    """The calls of one session: train, prefill, one chunk, speculative verification, decode."""
    prompt = seqlen - chunk
    return [
        Step("training step (fwd+bwd)", train_len, train_len, True),
        Step("prefill", prompt, prompt, False),
        Step("chunked prefill", chunk, seqlen, False),
        Step(f"speculative verify ({draft} drafts)", draft, seqlen + draft, False),
        Step("decode", 1, seqlen + draft + 1, False),
    ] + [Step("decode", 1, seqlen + draft + 1 + i, False) for i in range(1, decode_steps)]


def _time_pair(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: bool, device: torch.device,
               quick: bool) -> tuple[object, object]:
    """Interleaved repetitions of flashdispatch and plain SDPA on one call; their Spreads."""
    from flashdispatch.tools import timing

    def make(f: AttnFn) -> Callable[[], None]:
        if grad:
            do = torch.randn_like(q)
            return lambda: f(q, k, v, True).backward(do)

        def run() -> None:
            with torch.no_grad():
                f(q, k, v, True)

        return run

    grads = [q, k, v] if grad else None
    warm, rep = (5.0, 150.0) if quick else (25.0, 100.0)
    got = timing.interleaved_samples_ms({"fd": (make(fd_attn), grads), "sdpa": (make(sdpa_attn), grads)}, device,
                                        warmup_ms=warm, rep_ms=rep)
    return timing.Spread.of(got["fd"]), timing.Spread.of(got["sdpa"])


def _err(a: torch.Tensor, r: torch.Tensor) -> float:
    return float((a.double() - r).abs().max() / r.abs().max().clamp_min(1e-30))


def _describe(d: object) -> str:
    src = d.source  # type: ignore[attr-defined]
    if src.startswith("profile:"):
        path, _, entry = src[len("profile:"):].partition("#")
        src = f"profile {path.rsplit('/', 1)[-1]} {entry}"
    return f"{d.variant} (source: {src})"  # type: ignore[attr-defined]


def run_demo(device: torch.device | str | None = None, steps: int = 4, seqlen: int | None = None,
             json_out: str | None = None) -> int:
    from flashdispatch.tools import timing

    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = dev.type == "cuda"
    if steps < 1:
        raise ValueError(f"steps: expected a positive integer, got {steps}")
    s = seqlen if seqlen is not None else (8192 if gpu else 256)
    if s < MIN_SEQLEN:
        raise ValueError(f"seqlen: expected at least {MIN_SEQLEN} (a prompt, a chunk and drafts), got {s}")
    dtype = torch.bfloat16 if gpu else torch.float32
    heads = 8 if gpu else 2
    dim, b = heads * HEAD_DIM, (4 if gpu else 1)
    chunk, draft = min(512, s // 4), 8
    train_len = min(s, 2048 if gpu else 128)
    plan = plan_steps(s, chunk, draft, train_len, steps)
    card = torch.cuda.get_device_name(dev) if gpu else "CPU"
    print(f"flashdispatch demo on {card}: a {len(TinyDecoder(dim, heads, heads).blocks)}-layer decoder, "
          f"{heads} heads of dim {HEAD_DIM}, batch {b}, {str(dtype).replace('torch.', '')}, KV cache {s} tokens\n")

    torch.manual_seed(0)
    model64 = TinyDecoder(dim, heads, heads).double().to(dev)
    model = copy.deepcopy(model64).to(dtype)

    # -- the model through the session's calls: flashdispatch and plain SDPA give the same tokens
    x = torch.randn(b, s + draft + steps, dim, device=dev, dtype=dtype)

    def session(attn: AttnFn) -> torch.Tensor:
        caches: list[dict[str, torch.Tensor]] = [{} for _ in model.blocks]
        outs = []
        with torch.no_grad():
            pos = 0
            for st in plan[1:]:
                outs.append(model(x[:, pos:pos + st.sq], attn, caches))
                pos += st.sq
        return torch.cat(outs, dim=1)

    y_fd, y_sdpa = session(fd_attn), session(sdpa_attn)
    model_diff = float((y_fd.double() - y_sdpa.double()).abs().max() / y_sdpa.double().abs().max())

    # -- each kind of call: decision, time beside plain SDPA, error vs float64
    ok = True
    rows: list[dict[str, object]] = []
    seen: set[tuple[int, int, bool]] = set()
    gen = torch.Generator(device=dev).manual_seed(1)
    for st in plan:
        key = (st.sq, st.sk, st.grad)
        if st.label == "decode" and any(k[0] == 1 for k in seen):
            continue  # one decode row stands for all
        seen.add(key)
        q = torch.randn(b, heads, st.sq, HEAD_DIM, device=dev, dtype=dtype, generator=gen)
        k, v = (torch.randn(b, heads, st.sk, HEAD_DIM, device=dev, dtype=dtype, generator=gen) for _ in range(2))
        if st.grad:
            q, k, v = (t.requires_grad_(True) for t in (q, k, v))
        with torch.set_grad_enabled(st.grad):
            d = explain(q, k, v, causal=True)
        with torch.no_grad():
            ref = attention_math(q, k, v, causal=True)[0]
            e_fd, e_sdpa = _err(fd_attn(q, k, v, True), ref), _err(sdpa_attn(q, k, v, True), ref)
        good, _, _ = within_budget(fd_attn(q, k, v, True).detach(), sdpa_attn(q, k, v, True).detach(), ref, dtype)
        ok &= good
        t_fd, t_sdpa = _time_pair(q, k, v, st.grad, dev, quick=not gpu)
        up = timing.speedup(t_sdpa, t_fd)  # type: ignore[arg-type]
        verdict = f"{up:.2f}x plain SDPA's speed" if up else "same speed (the difference is inside the spread)"
        if d.variant == "sdpa":
            verdict += "; both run the same torch call, so a difference is flashdispatch's own cost, or noise"
        print(f"[{st.label}] Sq={st.sq} Sk={st.sk}{' with backward' if st.grad else ''}: {_describe(d)}\n"
              f"    flashdispatch {t_fd}   plain SDPA {t_sdpa}   -> {verdict}\n"
              f"    error vs float64: {e_fd:.1e} (plain SDPA {e_sdpa:.1e}){'' if good else '  OVER BUDGET'}")
        rows.append({"call": st.label, "sq": st.sq, "sk": st.sk, "grad": st.grad, "variant": d.variant,
                     "source": d.source, "fd_ms": t_fd.median, "sdpa_ms": t_sdpa.median,  # type: ignore[attr-defined]
                     "speedup": up, "err_fd": e_fd, "err_sdpa": e_sdpa})
    print("\ntimes: median [interquartile range] of interleaved repetitions of one attention call (every layer's "
          "call has this shape)")
    print(f"whole session through the model, flashdispatch vs plain SDPA: max relative difference {model_diff:.1e}")

    if not gpu:
        print("\nOn this CPU every call runs torch's SDPA (flashdispatch's own kernels are for GPUs). "
              "On an NVIDIA H100 (simulated with explain), the same calls at GPU size (bf16, 8 heads, batch 4, "
              "KV cache 8192) would run:")
        left_out: dict[str, str] = {}
        for st in plan_steps(8192, 512, draft, 2048, 1):
            try:
                d = explain(shape=(4, 8, 8, st.sq, st.sk, HEAD_DIM), dtype="bf16", causal=True, needs_grad=st.grad,
                            device="h100")
                what = _describe(d)
                left_out.update({n: r[0] for n, r in d.rejected.items() if r and r[0].startswith("unavailable:")})
            except Exception as e:  # NoBackendError: say so, keep going
                what = f"nothing ({type(e).__name__})"
            print(f"  [{st.label}] Sq={st.sq} Sk={st.sk}: {what}")
        if left_out:  # the simulation can only rank what this machine can import
            print("  (left out of this simulation because this machine cannot load them; on an H100 with torch's "
                  "CUDA wheel, which brings Triton, and `pip install 'flashdispatch[triton,cupy]'` they take part:)")
            for name, why in left_out.items():
                print(f"    {name}: {why[:110]}")

    # -- the training step through the whole model: outputs and gradients vs float64
    def train(m: TinyDecoder, attn: AttnFn, xx: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        m.zero_grad(set_to_none=True)
        xi = xx.detach().clone().requires_grad_(True)
        y = m(xi, attn)
        y.float().pow(2).mean().backward()
        return y.detach(), [xi.grad] + [p.grad for p in m.parameters()]  # type: ignore[list-item]

    xt = torch.randn(b, train_len, dim, device=dev, dtype=torch.float64)
    y_ref, g_ref = train(model64, ref_attn, xt)
    y_fd_t, g_fd = train(model, fd_attn, xt.to(dtype))
    y_pt, g_pt = train(model, sdpa_attn, xt.to(dtype))
    e_out = (_err(y_fd_t, y_ref), _err(y_pt, y_ref))
    e_grad = (max(_err(a, r) for a, r in zip(g_fd, g_ref)), max(_err(a, r) for a, r in zip(g_pt, g_ref)))
    train_ok = e_out[0] <= 2 * e_out[1] + 1e-3 and e_grad[0] <= 3 * e_grad[1] + 1e-3
    print(f"training step through the model vs float64: output error {e_out[0]:.1e} (plain SDPA {e_out[1]:.1e}), "
          f"gradients {e_grad[0]:.1e} ({e_grad[1]:.1e})")
    ok &= train_ok
    print("accuracy:", "OK (within flash-attention's 2x/3x budget of plain PyTorch)" if ok else "FAILED")
    if json_out:
        import json

        with open(json_out, "w", encoding="utf-8") as f:
            json.dump({"card": card, "dtype": str(dtype), "batch": b, "heads": heads, "head_dim": HEAD_DIM,
                       "calls": rows, "accuracy_ok": ok}, f, indent=1)
    return 0 if ok else 1
