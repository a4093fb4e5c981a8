"""The layers point down: every import between flashdispatch's modules is checked against a table.

Layers, bottom first (docs/design.md draws them):

    base         facts every layer may use: problem record, device table, errors, math reference,
                 tolerances, alignment, guards, the cost model (shape classes, fit, prediction)
    settings     what is read from outside: environment variables (envs), profiles (profile_store)
    interface    what a backend implements and is handed: backend (Implementation, Capabilities,
                 Inputs, Gradients), autograd (the one autograd Function)
    backends     flashdispatch.backends.*: kernels and their launch code; they know the interface
                 and the base, never the environment, profiles, selection or the CLI
    core         registry, selection, plans, api: knows backends only through the registry
    integrations custom ops (torch.compile), nn, hf, distributed, demo, the package facade
    tools        flashdispatch.tools.*: tune, bench, checks; public names only
    cli          the `flashdispatch` command, over everything

An import is allowed when its target's layer is in ALLOWED[source layer], or when the edge is in
EXCEPTIONS (each with its reason). A new module must be given a layer in LAYER_OF.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# setuptools' package-dir: folder -> import name
PACKAGE_DIRS = {"dispatch": "flashdispatch", "backends": "flashdispatch.backends", "tools": "flashdispatch.tools",
                "profiles": "flashdispatch.profiles"}

# the layer of each module: the longest matching prefix wins
LAYER_OF: dict[str, str] = {
    "flashdispatch.problem": "base",
    "flashdispatch.device": "base",
    "flashdispatch.errors": "base",
    "flashdispatch.reference": "base",
    "flashdispatch.tolerances": "base",
    "flashdispatch.alignment": "base",
    "flashdispatch.guards": "base",
    "flashdispatch.costmodel": "base",
    "flashdispatch.cliargs": "base",  # argparse with one-line user errors, for the cli and the tools
    "flashdispatch.envs": "settings",
    "flashdispatch.profile_store": "settings",
    "flashdispatch.profiles": "settings",
    "flashdispatch.backend": "interface",
    "flashdispatch.autograd": "interface",
    "flashdispatch.backends": "backends",
    "flashdispatch.registry": "core",
    "flashdispatch.selection": "core",
    "flashdispatch.plans": "core",
    "flashdispatch.api": "core",
    # autotune on first use: selection and the plan cache call it, it times implementations from
    # the registry and writes the profile overlay (profile_store's writer)
    "flashdispatch.autotune": "core",
    "flashdispatch": "integrations",  # the package facade (flashdispatch/__init__.py)
    "flashdispatch.ops": "integrations",
    "flashdispatch.nn": "integrations",
    "flashdispatch.hf": "integrations",
    # the demo times flashdispatch against plain SDPA and checks it against the reference, as the
    # benchmark does, with the tools' interleaved timing and plain-SDPA baseline (one definition each)
    "flashdispatch.demo": "tools",
    "flashdispatch.distributed": "integrations",
    "flashdispatch.tools": "tools",
    "flashdispatch.cli": "cli",
}

ALLOWED: dict[str, set[str]] = {
    "base": {"base"},
    "settings": {"base", "settings"},
    "interface": {"base", "settings", "interface"},
    "backends": {"base", "interface", "backends"},
    "core": {"base", "settings", "interface", "core"},
    "integrations": {"base", "settings", "interface", "core", "integrations"},
    "tools": {"base", "settings", "interface", "backends", "core", "integrations", "tools"},
    "cli": {"base", "settings", "interface", "backends", "core", "integrations", "tools", "cli"},
}

# (source module, target module): why this one edge is allowed
EXCEPTIONS: dict[tuple[str, str], str] = {
    ("flashdispatch.api", "flashdispatch.ops"):
        "under torch.compile attention() hands the call to the custom ops (imported only then: torch._dynamo "
        "costs a second to import)",
    ("flashdispatch", "flashdispatch.backends"):
        "the facade binds flashdispatch.backends, the package that is also the public call (its __init__ "
        "imports no backend)",
    ("flashdispatch.backends", "flashdispatch.registry"):
        "the package object is also the public call flashdispatch.backends(), which lists the registry",
}


def _module_files() -> dict[str, pathlib.Path]:
    mods: dict[str, pathlib.Path] = {}
    for folder, pkg in PACKAGE_DIRS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            mods[".".join([pkg, *parts])] = path
    return mods


MODULES = _module_files()


def layer_of(module: str) -> str | None:
    best = None
    for prefix in LAYER_OF:
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best)):
            best = prefix
    return LAYER_OF[best] if best else None


def _resolve(name: str) -> str | None:
    """The flashdispatch module `name` refers to (a module, or the package that defines a name)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports_by_name(node: ast.AST) -> bool:
    """importlib.import_module("flashdispatch...") or __import__("flashdispatch..."): an import by
    string, which the graph counts like an import statement."""
    if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)):
        return False
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
    return name in ("import_module", "__import__")


def imports_of(module: str) -> set[str]:
    """Every flashdispatch module that `module` imports, anywhere in its body (lazy imports too)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    here = module if is_pkg else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            names = [f"{base}.{a.name}" for a in node.names]
        elif _imports_by_name(node):
            names = [node.args[0].value]  # type: ignore[union-attr]
        else:
            continue
        for n in names:
            if n == "flashdispatch" or n.startswith("flashdispatch."):
                target = _resolve(n)
                if target is not None and target != module:
                    out.add(target)
    return out


def violations() -> list[str]:
    bad = []
    for module in MODULES:
        src = layer_of(module)
        if src is None:
            bad.append(f"{module}: no layer in LAYER_OF")
            continue
        for target in sorted(imports_of(module)):
            dst = layer_of(target)
            if dst in ALLOWED[src] or (module, target) in EXCEPTIONS:
                continue
            bad.append(f"{module} ({src}) imports {target} ({dst})")
    return bad


def test_every_import_points_down_or_is_a_listed_exception() -> None:
    assert not violations(), "\n".join(violations())


def test_every_exception_is_still_used() -> None:
    # an exception that no longer matches an import would allow the next wrong arrow silently
    stale = [edge for edge in EXCEPTIONS if edge[1] not in imports_of(edge[0])]
    assert not stale, stale


def test_the_check_fails_on_a_wrong_arrow(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    # a backend that reads the environment, and a core module that imports a backend by name
    fake = {"flashdispatch.backends.fake": tmp_path / "fake.py", "flashdispatch.fakecore": tmp_path / "core.py"}
    fake["flashdispatch.backends.fake"].write_text("from flashdispatch import envs\n")
    fake["flashdispatch.fakecore"].write_text("def f():\n    from .backends.triton import forward\n")
    fake["flashdispatch.fakeserving"] = tmp_path / "serving.py"
    fake["flashdispatch.fakeserving"].write_text(
        "import importlib\n\ndef g():\n    return importlib.import_module('flashdispatch.backends.sdpa_serving')\n")
    monkeypatch.setitem(LAYER_OF, "flashdispatch.fakeserving", "core")
    monkeypatch.setitem(LAYER_OF, "flashdispatch.fakecore", "core")
    for name, path in fake.items():
        monkeypatch.setitem(MODULES, name, path)
    bad = violations()
    assert "flashdispatch.backends.fake (backends) imports flashdispatch.envs (settings)" in bad, bad
    assert "flashdispatch.fakecore (core) imports flashdispatch.backends.triton.forward (backends)" in bad, bad
    assert "flashdispatch.fakeserving (core) imports flashdispatch.backends.sdpa_serving (backends)" in bad, bad


def test_only_the_registry_names_backend_modules() -> None:
    """The dispatcher knows backends through the registry: no other module of dispatch/ holds the
    dotted name of a backend module (to import it by string later)."""
    bad = []
    for module, path in MODULES.items():
        if not module.startswith("flashdispatch") or layer_of(module) in ("backends", "tools", "cli"):
            continue
        if module == "flashdispatch.registry":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and node.value.startswith("flashdispatch.backends.")):
                bad.append(f"{module}: {node.value!r}")
    assert not bad, bad


def test_tools_use_public_names_only() -> None:
    """tools/ reaches the package through names without a leading underscore."""
    bad = []
    for module, path in MODULES.items():
        if layer_of(module) != "tools":
            continue
        tree = ast.parse(path.read_text(), str(path))
        bound: set[str] = set()  # local names bound to flashdispatch modules
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flashdispatch") or (
                    isinstance(node, ast.ImportFrom) and node.level):
                for a in node.names:
                    if a.name.startswith("_"):
                        bad.append(f"{module}:{node.lineno} imports {a.name}")
                    bound.add(a.asname or a.name)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("flashdispatch"):
                        bound.add(a.asname or a.name.split(".")[0])
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in bound):
                bad.append(f"{module}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not bad, "\n".join(bad)
