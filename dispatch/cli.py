"""The `flashdispatch` command: info, explain, demo, and the tools (tune, bench, warmup)."""

from __future__ import annotations

import argparse
import importlib
import logging
import platform
import sys
from typing import Sequence

import torch

from . import envs
from .device import DEVICE_KEYS, current_device
from .errors import NoBackendError
from .problem import DTYPES_BY_NAME
from .registry import REGISTRY
from .selection import state


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
    from . import __version__

    dev = current_device(args.device or state().settings.device)
    profile, problems = state().profile(dev.profile_key)
    print(f"flashdispatch {__version__}")
    print(f"device:   {dev.describe()}")
    if profile:
        print(f"profile:  {profile.provenance()} ({len(profile.entries)} entries)")
    else:
        print(f"profile:  none for key {dev.profile_key!r}: built-in default order")
    for p in problems:
        print(f"          ! {p}")
    print("backends:")
    for st in REGISTRY.status():
        line = f"  {st.name:<15} " + ("available" if st.available else f"unavailable: {st.reason}")
        if st.available:
            caps = REGISTRY.get(st.name).capabilities(dev)
            if dev.kind not in caps.device_kinds:
                line += f" (but not on {dev.kind}: serves {sorted(caps.device_kinds)})"
        print(line)
    print("versions: " + ", ".join(f"{k} {v}" for k, v in _versions().items()))
    print("environment:")
    for var in envs.ALL:
        try:
            val = var.read()
        except envs.EnvError as e:
            val = f"INVALID ({e})"
        print(f"  {var.name}={val!r}")
    return 0


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(x) for x in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape: expected B,Hq,Hkv,Sq,Sk,D (integers), got {text!r}") from None
    if len(dims) != 6 or any(d < 0 for d in dims):
        raise argparse.ArgumentTypeError(f"--shape: expected 6 non-negative integers B,Hq,Hkv,Sq,Sk,D, got {text!r}")
    return dims


def cmd_explain(args: argparse.Namespace) -> int:
    from .api import explain

    try:
        d = explain(
            shape=args.shape, dtype=args.dtype, device=args.device, causal=args.causal,
            layout=args.layout, return_lse=args.lse, needs_grad=args.grad, backend=args.backend,
            head_dim_v=args.head_dim_v,
        )
    except NoBackendError as e:
        print(e)
        return 1
    print(d)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(device=args.device, steps=args.steps, seqlen=args.seqlen)


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
        print(f"flashdispatch {name}: {module} is not available: {e}", file=sys.stderr)
        return 2
    return int(getattr(mod, func)(argv))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="flashdispatch", description=__doc__)
    ap.add_argument("-v", "--verbose", action="store_true", help="log decisions and warnings")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("info", help="device, backends (available or why not), profile, versions")
    p.add_argument("--device", choices=DEVICE_KEYS, help="answer for a simulated device")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("explain", help="which backend a problem would get, and why")
    p.add_argument("--shape", type=_parse_shape, required=True, help="B,Hq,Hkv,Sq,Sk,D")
    p.add_argument("--dtype", choices=sorted(DTYPES_BY_NAME), default="bf16")
    p.add_argument("--device", choices=DEVICE_KEYS, help="answer for a simulated device")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--layout", choices=("bhsd", "bshd"), default="bhsd")
    p.add_argument("--lse", action="store_true", help="return_lse=True")
    p.add_argument("--grad", action="store_true", help="inputs require grad (training)")
    p.add_argument("--head-dim-v", type=int, default=None)
    p.add_argument("--backend", default=None, help="force a backend")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("demo", help="a small transformer block through flashdispatch.attention")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--steps", type=int, default=3, help="decode steps after the prefill")
    p.add_argument("--seqlen", type=int, default=None, help="prompt length (default: 128 on CPU, 2048 on GPU)")
    p.set_defaults(func=cmd_demo)

    for name, (_, _, helptext) in DELEGATED.items():
        sub.add_parser(name, help=helptext)  # listed in --help; parsed by its own module
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        return _run_delegated(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return int(args.func(args))
    except envs.EnvError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
