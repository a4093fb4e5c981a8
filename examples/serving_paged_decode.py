"""Decode a batch of sequences of different lengths from a paged KV cache under a CUDA graph.

    python examples/serving_paged_decode.py            # GPU: graph replays; CPU: eager, sdpa fallback

One attention layer with random weights stands in for a model. The server side is what matters:
a pool of pages (num_blocks, block_size, Hkv, D), a block table per sequence, cache_seqlens on the
device. Each step writes the new token's k/v into its page, bumps cache_seqlens on the device and
calls flashdispatch.attention_kvcache; the whole step is captured once and replayed, with a new
page handed to a sequence (a host-side table edit, copied into the captured table) when one fills.
"""

from __future__ import annotations

import time

import torch

import flashdispatch as fd

B, HQ, HKV, D, PAGE, MAX_BLOCKS = 8, 32, 8, 128, 16, 64
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
torch.manual_seed(0)

# the page pool, a block table, and the prompt lengths already in the cache
lengths = [37, 1, 500, 129, 16, 900, 250, 64]
num_blocks = B * MAX_BLOCKS
k_cache = torch.randn(num_blocks, PAGE, HKV, D, device=device, dtype=dtype)
v_cache = torch.randn_like(k_cache)
free = list(torch.randperm(num_blocks).tolist())
pages = [[free.pop() for _ in range(-(-n // PAGE))] for n in lengths]
table = torch.zeros(B, MAX_BLOCKS, dtype=torch.int32, device=device)
for b, p in enumerate(pages):
    table[b, :len(p)] = torch.tensor(p, dtype=torch.int32)
cache_seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)

w_qkv = torch.randn(HQ * D, (HQ + 2 * HKV) * D, device=device, dtype=dtype) / (HQ * D) ** 0.5
x = torch.randn(B, 1, HQ * D, device=device, dtype=dtype)  # the current token's hidden state


def step() -> torch.Tensor:
    """One decode step, device-side only: project, append k/v at position cache_seqlens, attend."""
    qkv = (x @ w_qkv).view(B, 1, HQ + 2 * HKV, D)
    q, k, v = qkv[:, :, :HQ], qkv[:, 0, HQ:HQ + HKV], qkv[:, 0, HQ + HKV:]
    pos = cache_seqlens.long()
    page = table.gather(1, (pos // PAGE).view(B, 1)).view(B).long()
    k_cache[page, pos % PAGE] = k
    v_cache[page, pos % PAGE] = v
    cache_seqlens.add_(1)
    out = fd.attention_kvcache(q, k_cache, v_cache, cache_seqlens=cache_seqlens, block_table=table)
    x.copy_(out.reshape(B, 1, HQ * D))  # the next token's input, here simply the output
    return out


def grow() -> None:
    """The host's page allocator: a sequence about to write the first row of a page gets one
    (a table edit, copied to the device; the captured graph reads the table at replay)."""
    for b in range(B):
        if lengths[b] % PAGE == 0:
            table[b, lengths[b] // PAGE] = free.pop()
        lengths[b] += 1


print(fd.explain_kvcache(x.view(B, 1, HQ, D), k_cache, v_cache, cache_seqlens=cache_seqlens, block_table=table))
run = step
if device == "cuda":
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # compile and check the launches (these are real decode steps)
            grow()
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()  # captured, not run: the replays below run it
    run = graph.replay

steps = 100 if device == "cuda" else 3
t0 = time.perf_counter()
for _ in range(steps):
    grow()
    run()
if device == "cuda":
    torch.cuda.synchronize()
dt = (time.perf_counter() - t0) / steps
assert cache_seqlens.tolist() == lengths, (cache_seqlens.tolist(), lengths)
print(f"{steps} decode steps of {B} sequences ({min(lengths)}..{max(lengths)} tokens now) on {device}: "
      f"{dt * 1e6:.0f} us per step{' (CUDA graph replays)' if device == 'cuda' else ''}")
