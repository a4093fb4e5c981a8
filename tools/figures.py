"""Profiles for devices we could not measure (A100, MI250X, MI300X), argued from figures.

The argument for each device is the ARGUMENTS text below, written into the file's header comment;
RANKINGS turns it into a ranking per kind of problem, written as the `ranking` of each point of the
cost model's groups (schema 2, dispatch/profile_store.py). No times and no configs are written
(each backend runs its default config for the problem, which tests/test_triton_aot.py compiles
ahead of time for every architecture): these files are `measured: false`. Regenerate with

    python -m flashdispatch.tools.figures --out profiles/

and replace a file by a measured one as soon as the card is at hand (`flashdispatch tune`).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from flashdispatch.device import simulated_device

from .profile_writer import unmeasured_profile
from .shapes import Shape, check_shape

_COMMON = """\
Rankings are argued from published figures (papers, vendor and PyTorch blogs) and from what
we measured on an H100 where the reason carries over (a kernel's structure, not its speed).
Each point of a group (pass x shape class x dtype x head dim) holds the argued order for that
kind of problem; the dispatcher takes the order of the nearest point (of the nearest group, and
says so). There are no times and no configs in this file: each backend runs its default config
for {arch} (compiled ahead of time for {arch} in CI). Replace it by measuring on the card:
    flashdispatch tune --profile-key {key}
Written by `python -m flashdispatch.tools.figures` (tools/figures.py holds this argument).
"""

_CHUNKED = """\
- Chunked prefill (causal with Sq < Sk, the bottom-right mask of a KV cache): SDPA's flash and
  cuDNN kernels take no bottom-right mask, so plain SDPA runs a mask path (measured on an H100: about
  330 TFLOP/s there against 527 for cuDNN's causal fast path at S=4096, 0.6x). Our kernels align
  the mask bottom-right natively and skip fully masked blocks (on an H100 the Triton kernel measured
  1.51-1.54x plain SDPA there, docs/triton.md): {order}."""

_DECODE = """\
- Decode: plain SDPA first at every batch. We read plain SDPA at 41% of copy bandwidth at
  B=1, Sk=8192 on an H100, which argues for a split-KV kernel over the {units}; but the H100 run of
  our split-KV kernel (docs/triton.md) found SDPA's GPU time as low as ours (11.6 vs 12.6 us in a
  CUDA graph) and our call host-bound (91 vs 27 us per call). Nothing published says otherwise
  for this card, so the kernel that measured faster on the card we have leads."""

ARGUMENTS: dict[str, str] = {
    "a100": """\
NVIDIA A100 (sm_80) profile - NOT MEASURED.
""" + _COMMON + """
- Prefill, forward and forward+backward: torch's SDPA flash backend on A100 is FlashAttention-2,
  which its paper reports at 132-203 TFLOP/s fwd+bwd on this card (dense peak 312), and plain SDPA
  picks it on sm_80. FlexAttention, a Triton-generated FA kernel, reaches about 90% of FA2's forward
  on A100 (PyTorch blog): our Triton kernel, of that kind and not tuned on this card, is ranked
  behind both SDPA entries; our CUDA kernel (cupy: FA2-style mma.sync, not tuned here either) next;
  cuDNN and the efficient kernel last.
""" + _CHUNKED.format(order="triton, then cupy, then plain SDPA") + "\n" + _DECODE.format(units="108 SMs"),
    "mi250x": """\
AMD Instinct MI250X (gfx90a) profile - NOT MEASURED.
""" + _COMMON + """
- Prefill, forward and forward+backward: torch's ROCm SDPA flash and efficient backends are
  AOTriton, Triton FlashAttention kernels that AMD tunes per architecture; our Triton kernel is the
  same kind of kernel with AMD's published default settings (waves_per_eu=2, 16x16 MFMA) and no
  tuning on this card, so it is ranked behind plain SDPA and its flash backend. The cupy backend is
  CUDA-only; cuDNN does not exist here.
""" + _CHUNKED.format(order="triton, then plain SDPA") + "\n" + _DECODE.format(units="110 CUs of a GCD"),
    "mi300x": """\
AMD Instinct MI300X (gfx942) profile - NOT MEASURED.
""" + _COMMON + """
- Prefill, forward and forward+backward: as for MI250X, torch's ROCm SDPA backends are AOTriton
  kernels tuned by AMD for gfx942 (dense bf16 peak 1307 TFLOP/s); our Triton kernel runs AMD's
  published default settings untuned, so it is ranked behind plain SDPA and its flash backend.
  The cupy backend is CUDA-only; cuDNN does not exist here.
""" + _CHUNKED.format(order="triton, then plain SDPA") + "\n" + _DECODE.format(units="304 CUs"),
}

# The kinds of problem the arguments distinguish, and their order (names a device lacks are left
# out by the writer, which keeps only implementations that can serve the entry there).
RANKINGS: dict[str, dict[str, tuple[str, ...]]] = {
    "a100": {
        "prefill": ("sdpa", "sdpa:flash", "triton", "cupy", "sdpa:cudnn", "sdpa:efficient"),
        "chunked": ("triton", "cupy", "sdpa", "sdpa:efficient"),
        "decode_small": ("sdpa", "sdpa:flash", "triton", "cupy", "sdpa:efficient"),
        "decode_large": ("sdpa", "sdpa:flash", "triton", "cupy", "sdpa:efficient"),
    },
    "mi250x": {
        "prefill": ("sdpa", "sdpa:flash", "triton", "sdpa:efficient"),
        "chunked": ("triton", "sdpa", "sdpa:efficient"),
        "decode_small": ("sdpa", "sdpa:flash", "triton", "sdpa:efficient"),
        "decode_large": ("sdpa", "sdpa:flash", "triton", "sdpa:efficient"),
    },
}
RANKINGS["mi300x"] = RANKINGS["mi250x"]
# Batch up to which a decode problem counts as "small" (too few blocks to fill the GPU).
DECODE_SMALL_BATCH = 8


def kind_of(s: Shape) -> str:
    if s.pass_ == "decode":
        return "decode_small" if s.batch <= DECODE_SMALL_BATCH else "decode_large"
    if s.causal and s.seqlen_q < s.seqlen_k:
        return "chunked"
    return "prefill"


def entry_shapes() -> list[Shape]:
    """Points for every kind of problem the argument distinguishes (the dispatcher takes the
    nearest point's order)."""
    out: list[Shape] = []
    for dt in ("bf16", "fp16"):
        for d in (64, 128):
            h = 2048 // d
            for pass_ in ("fwd", "fwd_bwd"):
                for causal in (False, True):
                    for s in (1024, 4096):
                        out.append(Shape(f"prefill-{pass_}-{dt}-d{d}-{int(causal)}-s{s}", dt, 16384 // s, h, h, s, s, d,
                                         causal, pass_))
            out.append(Shape(f"chunked-{dt}-d{d}", dt, 4, 32, 32, 512, 8192, d, True, "fwd"))
            out.append(Shape(f"decode-b1-{dt}-d{d}", dt, 1, 32, 8, 1, 8192, d, False, "decode"))
            out.append(Shape(f"decode-b64-{dt}-d{d}", dt, 64, 32, 8, 1, 2048, d, False, "decode"))
    return [check_shape(s) for s in out]


def profile_text(key: str) -> str:
    header = ARGUMENTS[key].format(key=key, arch=simulated_device(key).arch)
    rules = RANKINGS[key]
    return unmeasured_profile(key, header, lambda s: rules[kind_of(s)], entry_shapes(),
                                   command="python -m flashdispatch.tools.figures")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flashdispatch.tools.figures", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="profiles", help="directory to write <key>.yaml into")
    ap.add_argument("--keys", type=lambda t: [x.strip() for x in t.split(",") if x.strip()], default=list(ARGUMENTS),
                    help="comma-separated device keys")
    args = ap.parse_args(argv)
    for key in args.keys:
        if key not in ARGUMENTS:
            print(f"--keys: expected some of {sorted(ARGUMENTS)}, got {key!r}", file=sys.stderr)
            return 2
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"{key}.yaml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(profile_text(key))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
