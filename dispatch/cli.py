"""The `flashdispatch` command: info, explain, demo, and the tools (tune, bench, warmup)."""

from __future__ import annotations

import argparse
import importlib
import logging
import platform
import sys
from typing import Any, Sequence

import torch

from . import envs
from .costmodel import SERVING_CLASSES
from .cliargs import USAGE_ERROR, ArgumentParser, int_at_least, positive_int, show_logs, user_error
from .device import DEVICE_KEYS, current_device
from .errors import NoBackendError
from .problem import DTYPES_BY_NAME
from .registry import REGISTRY
from .selection import read_profile


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "cupy"):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except Exception as e:  # not installed, or broken: say which
            out[mod] = f"not usable ({type(e).__name__})"
    out["cuda (torch)"] = str(torch.version.cuda)
    out["hip (torch)"] = str(torch.version.hip)
    return out


def cmd_info(args: argparse.Namespace) -> int:
    """The report; with a bad FLASHDISPATCH_* variable, the report under that variable's default,
    the variable's INVALID line, and exit status 2 (attention() raises until it is fixed)."""
    from . import __version__

    settings, bad = envs.read_settings_reporting()
    dev = current_device(args.device or settings.device)
    profile, problems = read_profile(dev.profile_key, settings)
    print(f"flashdispatch {__version__}")
    print(f"device:   {dev.describe()}" + (f" ({envs.FLASHDISPATCH_DEVICE.name} is invalid: its default shown)"
                                           if envs.FLASHDISPATCH_DEVICE.name in bad and not args.device else ""))
    if profile:
        print(f"profile:  {profile.provenance()} ({len(profile.groups)} groups, {sum(len(g.points) for g in profile.groups)} points)")
        classes = sorted({g.key.cls for g in profile.groups if g.key.cls in SERVING_CLASSES})
        print("          serving calls: " + (f"modelled ({', '.join(classes)})" if classes else
                                             "not measured (attention_varlen / attention_kvcache take the built-in order)"))
    else:
        print(f"profile:  none for key {dev.profile_key!r}: built-in default order")
    for p in problems:
        print(f"          ! {p}")
    from .autotune import describe_overlay

    print(f"          {describe_overlay(settings, dev.profile_key)}")
    print("backends:")
    for st in REGISTRY.status(dev):
        print(f"  {st.name:<15} " + ("available" if st.available else f"unavailable: {st.reason}"))
    print("versions: " + ", ".join(f"{k} {v}" for k, v in _versions().items()))
    print("environment:")
    for var in envs.ALL:
        print(f"  INVALID: {bad[var.name]}" if var.name in bad else f"  {var.name}={var.read()!r}")
    if bad:
        return user_error("flashdispatch info", envs.EnvError(
            "; ".join(str(e) for e in bad.values())
            + f" (attention() raises until {'it is' if len(bad) == 1 else 'they are'} fixed or unset)"))
    return 0


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(x) for x in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected B,Hq,Hkv,Sq,Sk,D (integers), got {text!r}") from None
    if len(dims) != 6 or any(d < 0 for d in dims):
        raise argparse.ArgumentTypeError(f"expected 6 non-negative integers B,Hq,Hkv,Sq,Sk,D, got {text!r}")
    return dims


def _parse_window(text: str) -> tuple[int, int]:
    try:
        left, right = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LEFT,RIGHT (integers, -1 unbounded), got {text!r}") from None
    return left, right


_page_size = int_at_least(0, "a page size >= 0 (rows per page; 0: a contiguous cache)")


def _serving_decision(args: argparse.Namespace) -> Any:
    """explain for --varlen / --kvcache: meta tensors of the shape (B sequences; varlen: Sq queries
    and Sk keys each, packed; kvcache: Sq new rows against a cache of capacity Sk, in pages of
    --kvcache rows, 0 contiguous)."""
    from . import serving

    b, hq, hkv, sq, sk, d = args.shape
    dv = args.head_dim_v or d
    meta: dict[str, Any] = dict(device="meta", dtype=DTYPES_BY_NAME[args.dtype])
    ints: dict[str, Any] = dict(device="meta", dtype=torch.int32)
    kw: dict[str, Any] = dict(causal=args.causal, window=args.window, softcap=args.softcap, return_lse=args.lse,
                              backend=args.backend, device=args.device,
                              sinks=torch.empty(hq, device="meta", dtype=torch.float32) if args.sinks else None)
    if args.varlen:
        q = torch.empty(b * sq, hq, d, **meta).requires_grad_(args.grad)
        k, v = torch.empty(b * sk, hkv, d, **meta), torch.empty(b * sk, hkv, dv, **meta)
        with torch.set_grad_enabled(args.grad):
            return serving.explain_varlen(q, k, v, torch.empty(b + 1, **ints), torch.empty(b + 1, **ints), sq, sk, **kw)
    if args.grad:
        raise ValueError("--grad: attention_kvcache is forward only")
    page = args.kvcache
    q = torch.empty(b, sq, hq, d, **meta)
    if page:
        if sk % page:
            raise ValueError(f"--shape: a paged cache holds whole pages: expected Sk a multiple of --kvcache {page}, "
                             f"got Sk={sk}")
        blocks = sk // page
        kc, vc = torch.empty(b * blocks, page, hkv, d, **meta), torch.empty(b * blocks, page, hkv, dv, **meta)
        table = torch.empty(b, blocks, **ints)
    else:
        kc, vc, table = torch.empty(b, sk, hkv, d, **meta), torch.empty(b, sk, hkv, dv, **meta), None
    return serving.explain_kvcache(q, kc, vc, cache_seqlens=torch.empty(b, **ints), block_table=table, **kw)


def cmd_explain(args: argparse.Namespace) -> int:
    from .api import explain

    try:
        if args.varlen or args.kvcache is not None:
            if args.varlen and args.kvcache is not None:
                raise ValueError("--varlen and --kvcache: expected at most one of them")
            d = _serving_decision(args)
        else:
            d = explain(
                shape=args.shape, dtype=args.dtype, device=args.device, causal=args.causal,
                layout=args.layout, return_lse=args.lse, needs_grad=args.grad, backend=args.backend,
                head_dim_v=args.head_dim_v, window=args.window, softcap=args.softcap, sinks=args.sinks,
            )
    except NoBackendError as e:  # an answer (nothing can serve this problem), not a usage error
        print(e)
        return 1
    print(d)
    return 0


def _demo_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device: expected cpu, cuda or cuda:N, got {name!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected cpu, cuda or cuda:N, got {name!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device: {name!r} asked for, but this machine has no CUDA or ROCm GPU torch can use")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device: {name!r} asked for, but this machine has {torch.cuda.device_count()} GPU(s)")
    return dev


def cmd_demo(args: argparse.Namespace) -> int:
    import os

    from .demo import run_demo

    # what would stop it is said before it starts, not after the demo has run
    envs.read_settings()
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise ValueError(f"--json: expected a file in an existing directory, got {args.json!r}")
    return run_demo(device=_demo_device(args.device), steps=args.steps, seqlen=args.seqlen, json_out=args.json)


# Subcommands whose argument parsing belongs to their own module: name -> (module, function, help).
DELEGATED: dict[str, tuple[str, str, str]] = {
    "tune": ("flashdispatch.tools.tune", "main", "measure backends and write a profile (see tune --help)"),
    "bench": ("flashdispatch.tools.bench", "main", "benchmark every backend vs plain SDPA (see bench --help)"),
    "warmup": ("flashdispatch.tools.warmup", "warmup_main", "precompile the cupy kernels the profile can choose"),
}


def _run_delegated(name: str, argv: list[str]) -> int:
    module, func, _ = DELEGATED[name]
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        print(f"flashdispatch {name}: error: {module} is not available: {e}", file=sys.stderr)
        return USAGE_ERROR
    try:
        return int(getattr(mod, func)(argv))
    except (ValueError, TypeError, OSError, envs.EnvError, NoBackendError) as e:
        # bad input, or a path that cannot be read or written (--plot-from, --out, --state)
        return user_error(f"flashdispatch {name}", e)


# what `flashdispatch <command> --help` says first
_DESCRIPTIONS = {
    "info": "This machine (or a simulated one, --device): the device, each backend and whether it can serve "
            "problems here (or why not), the profile the decisions come from and its provenance, versions and "
            "the FLASHDISPATCH_* settings.",
    "explain": "The decision attention() would make for one problem, without running it: the backend, its "
               "config, where the decision comes from (profile, default, forced), each backend's predicted time "
               "and why every other backend was passed over. --device answers for a GPU this machine does not have.",
    "demo": "A small decoder run through flashdispatch and through plain SDPA: a training step, prefill, chunked "
            "prefill, speculative verification and decode steps, each with the backend chosen and why, the time "
            "beside plain SDPA's (median and spread of interleaved repetitions) and the error against float64. "
            "On a CPU it also shows what an H100 would run.",
}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    ap = ArgumentParser(prog="flashdispatch", description=__doc__)
    ap.add_argument("-v", "--verbose", action="store_true", help="log decisions and warnings")
    ap.add_argument("--version", action="version", version=f"flashdispatch {__version__} (torch {torch.__version__})")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=ArgumentParser)

    p = sub.add_parser("info", help="device, backends (available or why not), profile, versions",
                       description=_DESCRIPTIONS["info"])
    p.add_argument("--device", choices=DEVICE_KEYS, help="answer for a simulated device")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("explain", help="which backend a problem would get, and why",
                       description=_DESCRIPTIONS["explain"])
    p.add_argument("--shape", type=_parse_shape, required=True, help="B,Hq,Hkv,Sq,Sk,D")
    p.add_argument("--dtype", choices=sorted(DTYPES_BY_NAME), default="bf16")
    p.add_argument("--device", choices=DEVICE_KEYS, help="answer for a simulated device")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--layout", choices=("bhsd", "bshd"), default="bhsd")
    p.add_argument("--lse", action="store_true", help="return_lse=True")
    p.add_argument("--grad", action="store_true", help="inputs require grad (training)")
    p.add_argument("--head-dim-v", type=positive_int, default=None, metavar="DV",
                   help="head dim of v, when it differs from q's and k's (default: D)")
    p.add_argument("--backend", default=None, help="force a backend")
    p.add_argument("--window", type=_parse_window, default=None, metavar="LEFT,RIGHT",
                   help="sliding window, flash_attn's convention (Mistral: 4095,0 with --causal; -1 unbounded)")
    p.add_argument("--softcap", type=float, default=None, help="logit soft-cap c > 0 (Gemma 2: 50)")
    p.add_argument("--sinks", action="store_true", help="the call passes attention sinks (gpt-oss)")
    p.add_argument("--varlen", action="store_true",
                   help="an attention_varlen call: B packed sequences of Sq queries and Sk keys each")
    p.add_argument("--kvcache", type=_page_size, default=None, metavar="PAGE",
                   help="an attention_kvcache call: Sq new rows per sequence against a cache of capacity Sk, in "
                        "pages of PAGE rows (0: a contiguous cache); add --causal for the bottom-right mask")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("demo", help="a small decoder through flashdispatch: what it picks, how fast, how exact",
                       description=_DESCRIPTIONS["demo"])
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if present)")
    p.add_argument("--steps", type=positive_int, default=4, help="decode steps (default: 4)")
    p.add_argument("--seqlen", type=positive_int, default=None,
                   help="tokens in the KV cache before the speculative and decode steps "
                        "(default: 256 on CPU, 8192 on GPU; at least 64)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the calls' decisions and times as JSON")
    p.set_defaults(func=cmd_demo)

    for name, (_, _, helptext) in DELEGATED.items():
        sub.add_parser(name, help=helptext)  # listed in --help; parsed by its own module
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        show_logs(logging.INFO)  # the tools report progress at INFO
        return _run_delegated(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    show_logs(logging.INFO if args.verbose else logging.WARNING)
    try:
        return int(args.func(args))
    except (ValueError, TypeError, OSError, envs.EnvError) as e:
        # bad input (a shape with Hq % Hkv != 0, an unknown backend, a bad environment variable):
        # one line naming what was wrong, not a traceback
        return user_error(f"flashdispatch {args.cmd}", e)


if __name__ == "__main__":
    sys.exit(main())
