"""The Triton backend: own FlashAttention-2 forward, split-KV decode, backward (backward.py).

Triton itself is imported lazily (forward.py and decode.py import it; this module does not), so a
missing or broken Triton makes the backend "unavailable" with the reason instead of breaking
`import flashdispatch`.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Any, ClassVar

import torch

from flashdispatch.backend import Capabilities, Gradients, Implementation, on_inputs, triton_interpreter_on
from flashdispatch.device import DeviceInfo
from flashdispatch.problem import Problem

from . import configs

_GPU_KINDS = frozenset({"cuda", "rocm"})
_ROCM_ARCHS = frozenset({"gfx90a", "gfx942"})
_GPU_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})
# bf16 tl.dot returns garbage in the interpreter of Triton 3.6: CPU runs are fp16/fp32 only.
_INTERPRETER_DTYPES = frozenset({torch.float16, torch.float32})


@functools.cache
def _kernels(name: str) -> ModuleType:
    """This package's module `name` (forward, decode, backward, gluon_forward), imported on first
    use: they import Triton, which this module must not. A call reads it here (about 50 ns) rather
    than through an import statement (about 0.8 us per call on a CPU)."""
    return importlib.import_module(f"{__name__}.{name}")


def _interpreter_on() -> bool:
    # whether TRITON_INTERPRET asks for the CPU interpreter, as envs.py reads it (handed over by the
    # backend interface: backends never read the environment themselves)
    return triton_interpreter_on()


def _wants_decode_kernel(p: Problem, config: dict[str, Any]) -> bool:
    return p.is_decode and not p.needs_grad and config.get("PATH", "split_kv") == "split_kv"


class TritonAttention(Implementation):
    """FlashAttention-2 forward (pointer or TMA kernel) and split-KV decode, written in Triton."""

    name: ClassVar[str] = "triton"
    default_rank: ClassVar[int | None] = 10
    backend: ClassVar[str] = "triton"
    pin: ClassVar[str | None] = "triton:tl"  # "triton" lets the family choose (the Gluon forward on Hopper)

    def availability(self) -> str | None:
        try:
            import triton  # noqa: F401

            from . import decode, forward  # noqa: F401  (compiles nothing; checks the kernels parse)
        except Exception as e:  # ImportError, or a Triton too old for the language features used
            return f"triton import failed: {type(e).__name__}: {e}"
        return None

    def capabilities(self, dev: DeviceInfo) -> Capabilities:
        from .forward import backward_available

        kinds = _GPU_KINDS | ({"cpu"} if _interpreter_on() else set())
        return Capabilities(
            device_kinds=frozenset(kinds),
            dtypes=_INTERPRETER_DTYPES if dev.kind == "cpu" else _GPU_DTYPES,
            min_cuda_capability=80,
            rocm_archs=_ROCM_ARCHS,
            max_head_dim=configs.MAX_HEAD_DIM,
            backward=backward_available(),
            lse=True,
            window=True,
            softcap=True,
            sinks=True,
            decode_shares_kv=True,  # decode.py: one program per (K/V head, key split) holds the whole group
            emulated=dev.kind == "cpu",
            notes="FlashAttention-2 forward, split-KV decode; window, softcap and sinks fused; "
                  "cpu only under TRITON_INTERPRET=1",
            device_hint=("on a CPU, Triton runs only in its interpreter: set TRITON_INTERPRET=1 in the "
                         "environment (fp16/fp32, slow: for tests)"),
        )

    def extra_reasons(self, p: Problem, dev: DeviceInfo) -> list[str]:
        if dev.kind == "cpu" and p.dtype == torch.bfloat16 and _interpreter_on():
            return ["bf16 under TRITON_INTERPRET=1: Triton's interpreter computes bf16 tl.dot wrongly, "
                    "so bf16 runs on GPUs only"]
        return []

    def _arch(self, dev: DeviceInfo) -> str:
        return configs.arch_family(dev.kind, dev.arch)

    def default_config(self, p: Problem, dev: DeviceInfo) -> dict[str, Any]:
        arch = self._arch(dev)
        if p.is_decode and not p.needs_grad:
            return configs.decode_defaults(arch, p.head_dim)
        return configs.forward_defaults(arch, max(p.head_dim, p.head_dim_v), p.effective_causal, p.seqlen_q,
                                        p.seqlen_k)

    def serving_module(self) -> Any:
        from . import serving  # varlen forward/backward and the (paged) KV-cache decode

        return serving

    def config_space(self, p: Problem, dev: DeviceInfo) -> list[dict[str, Any]]:
        arch = self._arch(dev)
        elt = 4 if p.dtype == torch.float32 else 2
        forward = configs.forward_config_space(arch, p.head_dim, p.head_dim_v, elt)
        if p.is_decode and not p.needs_grad:
            return configs.decode_config_space(arch, max(p.head_dim, p.head_dim_v)) + [
                {**c, "PATH": "forward"} for c in forward
            ]
        if p.needs_grad:
            # training is ranked by forward + backward time: vary the backward's tiles too, on the
            # default forward (the product of both spaces would multiply the tuning time)
            bwd = configs.backward_config_space(p.head_dim, p.head_dim_v, fp32=p.dtype == torch.float32,
                                                arch=arch)
            base = self.default_config(p, dev)
            return forward + [{**base, **b} for b in bwd[1:]]
        return forward

    def plan_notes(self, p: Problem, dev: DeviceInfo, config: dict[str, Any]) -> list[str]:
        arch = self._arch(dev)
        if _wants_decode_kernel(p, config):
            from .decode import decode_plan, visible_key_range

            cfg = configs.resolve_decode(config, arch, p.head_dim)
            sms = dev.sm_count or configs.SM_COUNT_FALLBACK
            lo, hi = visible_key_range(p.causal, p.window, p.seqlen_q, p.seqlen_k)
            block_m, m_blocks, splits = decode_plan(cfg, p.batch, p.heads_q, p.heads_kv, p.seqlen_q,
                                                    max(hi - lo, 1), sms)
            merge = "then an lse merge kernel" if splits > 1 else "no merge (one split)"
            keys = f"the {hi - lo} keys the window leaves" if p.has_window else "Sk"
            return [f"split-KV decode: {p.gqa_ratio} q heads x {p.seqlen_q} queries per program "
                    f"(BLOCK_M={block_m}), {keys} over {splits} splits, {merge}"] + _variant_notes(p)
        cfg = configs.resolve_forward(config, arch, max(p.head_dim, p.head_dim_v), p.effective_causal,
                                      p.seqlen_q, p.seqlen_k)
        kernel = ("TMA tensor-descriptor kernel (pointer kernel where a base or stride is not 16-byte aligned)"
                  if cfg.get("TMA") else "pointer kernel")
        notes = [f"forward {kernel} BLOCK_M={cfg['BLOCK_M']} BLOCK_N={cfg['BLOCK_N']}"]
        if cfg.get("WS"):
            notes.append("warp-specialised key loop")
        if p.needs_grad and config.get("BWD_DQ_ATOMIC"):
            notes.append("backward accumulates dq with float atomics: not bitwise deterministic")
        if p.is_decode and p.needs_grad:
            notes.append("decode shape with requires_grad: forward kernel (the split-KV path has no backward)")
        if p.effective_causal and p.seqlen_q > p.seqlen_k and not p.has_window:
            notes.append(f"first {p.seqlen_q - p.seqlen_k} query rows see no key: zeros, "
                         f"{'lse=sink' if p.sinks else 'lse=-inf'}")
        return notes + _variant_notes(p)

    def forward(self, inp, p, config):  # type: ignore[no-untyped-def]
        variant = _variant_kwargs(p, inp)
        if _wants_decode_kernel(p, config):
            return _kernels("decode").decode_forward(inp.q, inp.k, inp.v, causal=p.causal, scale=p.scale,
                                                     config=config, **variant)
        return _kernels("forward").attention_forward(inp.q, inp.k, inp.v, causal=p.causal, scale=p.scale,
                                                     config=config, **variant)

    def prepare(self, inp, p, config):  # type: ignore[no-untyped-def]
        kernel = ("decode", "prepare_decode") if _wants_decode_kernel(p, config) else ("forward", "prepare_forward")
        launch = getattr(_kernels(kernel[0]), kernel[1])(inp.q, inp.k, inp.v, causal=p.causal, scale=p.scale,
                                                         config=config, **_variant_kwargs(p, inp))
        return on_inputs(launch, "sinks" if p.sinks else None)

    def backward(self, inp, out, lse, do, p, config):  # type: ignore[no-untyped-def]
        variant = _variant_kwargs(p, inp)
        grads = _kernels("backward").attention_backward(do, inp.q, inp.k, inp.v, out, lse, causal=p.causal,
                                                        scale=p.scale, config=config, **variant)
        if variant:
            extras = {"sinks": grads[3]} if p.sinks else {}
            return Gradients(grads[0], grads[1], grads[2], extras)
        return Gradients(*grads)


def _variant_kwargs(p: Problem, inp: Any) -> dict[str, Any]:
    """window / softcap / sinks keyword arguments of the kernels' launch functions ({} for plain
    attention, so that the plain path passes nothing)."""
    if not p.is_variant:
        return {}
    return {"window": p.window if p.has_window else None, "softcap": p.softcap or None,
            "sinks": inp.extras["sinks"] if p.sinks else None}


def _variant_notes(p: Problem) -> list[str]:
    notes = []
    if p.has_window:
        from flashdispatch.problem import causal_visible_pairs, window_visible_pairs

        full = causal_visible_pairs(p.seqlen_q, p.seqlen_k) if p.effective_causal else p.seqlen_q * p.seqlen_k
        seen = window_visible_pairs(p.seqlen_q, p.seqlen_k, p.window)
        share = f" ({seen / full:.0%} of the {'causal' if p.effective_causal else 'full'} pairs)" if full else ""
        notes.append(f"window={p.window}: key blocks outside the window are skipped, work follows the "
                     f"visible pairs{share}")
    if p.softcap:
        notes.append(f"softcap={p.softcap:g} fused in the kernel (tanh.approx.f32 for bf16 on NVIDIA)")
    if p.sinks:
        notes.append("sinks fused: the online softmax starts from the head's sink; dsinks from lse and delta")
    return notes


class TritonGluonAttention(Implementation):
    """FlashAttention-3's schedule written in Gluon for Hopper (gluon_forward.py): a TMA producer
    warp and consumer warpgroups taking turns on the tensor cores, with a fused sliding window (key
    blocks outside it are never loaded). Forward only; gradients come from the Triton backward,
    which takes this kernel's out and lse (and the window)."""

    name: ClassVar[str] = "triton:gluon"
    backend: ClassVar[str] = "triton"

    def availability(self) -> str | None:
        try:
            from . import gluon_forward  # noqa: F401  (imports triton.experimental.gluon; compiles nothing)
        except Exception as e:  # no Triton, or one without Gluon or with another Gluon API
            return f"gluon import failed: {type(e).__name__}: {e}"
        return None

    def capabilities(self, dev: DeviceInfo) -> Capabilities:
        from .forward import backward_available
        from .gluon_forward import DTYPES, HEAD_DIMS

        return Capabilities(
            device_kinds=frozenset({"cuda"}),
            dtypes=DTYPES,
            cuda_archs=frozenset({"sm_90"}),  # wgmma and setmaxnreg: Hopper only (Blackwell has tcgen05)
            head_dims=frozenset(HEAD_DIMS),
            different_v_head_dim=False,
            backward=backward_available(),
            lse=True,
            # the window is fused (only the key blocks inside it are visited); softcap and sinks are
            # not written for this kernel: the tl kernel serves them
            window=True,
            fuses_variants=True,
            notes="FlashAttention-3 schedule in Gluon: TMA producer warp, ping-pong wgmma warpgroups; window "
                  "fused; sm_90",
        )

    def default_config(self, p: Problem, dev: DeviceInfo) -> dict[str, Any]:
        from .gluon_forward import default_config

        return default_config(p.head_dim, p.causal, p.seqlen_q, p.seqlen_k, p.has_window)

    def config_space(self, p: Problem, dev: DeviceInfo) -> list[dict[str, Any]]:
        from .gluon_forward import config_space

        return config_space(p.head_dim, p.causal, p.seqlen_q, p.seqlen_k, p.has_window)

    def plan_notes(self, p: Problem, dev: DeviceInfo, config: dict[str, Any]) -> list[str]:
        from .gluon_forward import resolve_config

        cfg = resolve_config(p.head_dim, config, p.causal, p.seqlen_q, p.seqlen_k, p.has_window)
        notes = [f"Gluon forward: {cfg['CONSUMERS']} consumer warpgroups x 64 query rows, BLOCK_N={cfg['BLOCK_N']}, "
                 f"{cfg['STAGES']} K/V stages, persistent over {dev.sm_count or 'all'} SMs"]
        if p.needs_grad:
            notes.append("gradients: the Triton backward, from this forward's out and lse")
        if p.effective_causal and p.seqlen_q > p.seqlen_k and not p.has_window:
            notes.append(f"first {p.seqlen_q - p.seqlen_k} query rows see no key: zeros, lse=-inf")
        return notes + _variant_notes(p)

    def forward(self, inp, p, config):  # type: ignore[no-untyped-def]
        return _kernels("gluon_forward").gluon_attention_forward(
            inp.q, inp.k, inp.v, causal=p.causal, scale=p.scale, config=config,
            window=p.window if p.has_window else None)

    def prepare(self, inp, p, config):  # type: ignore[no-untyped-def]
        return on_inputs(_kernels("gluon_forward").prepare_gluon_forward(
            inp.q, inp.k, inp.v, causal=p.causal, scale=p.scale, config=config,
            window=p.window if p.has_window else None))

    def backward(self, inp, out, lse, do, p, config):  # type: ignore[no-untyped-def]
        # the backward's own tiles: this implementation's config holds the forward's keys only
        return Gradients(*_kernels("backward").attention_backward(
            do, inp.q, inp.k, inp.v, out, lse, causal=p.causal, scale=p.scale, config={},
            window=p.window if p.has_window else None))


IMPLEMENTATIONS: list[Implementation] = [TritonAttention(), TritonGluonAttention()]
