"""The package layout is the architecture: each package imports only the packages below it, no
module imports itself back through others, and the torch-free packages stay torch-free by
structure (checked by importing them in a fresh interpreter and reading `sys.modules`).

Imports are read from the source (every `import`, function-level ones included), so a lazy
import that only hides a cycle or an upward dependency is caught too.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

PACKAGE = ROOT / "captioner"

# Package -> the captioner packages it may import (besides itself). Lower layers first; top
# (`cli`, `demo`, `bench`, `__main__`) may import anything.
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "io": {"core"},
    "data": {"core", "io"},
    "modeling": {"core", "io"},
    "training": {"core", "io", "data", "modeling"},
    "serving": {"core", "io"},
    "export": {"core", "io", "data", "modeling", "serving"},
    "web": {"core", "serving"},
    "cluster": {"core", "io", "serving"},
    "pipeline": {"core", "io", "data", "modeling", "training", "export", "serving", "cluster"},
}
TOP = {"cli", "demo", "bench", "__main__", "__init__"}

# Modules that must import without torch, the ONNX export library or the KFP SDK: what the
# Triton Python models, `captioner serve`, the web gateway and `captioner ingest`/`verify` run.
TORCH_FREE = ("captioner.core", "captioner.io", "captioner.serving", "captioner.web",
              "captioner.data.sources", "captioner.data.manifest", "captioner.data.ingest")
FORBIDDEN = ("torch", "onnx", "kfp", "timm", "captioner.modeling", "captioner.training", "captioner.export")
GATEWAY_FORBIDDEN = ("tokenizers", "onnxruntime")


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        parts = p.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The captioner modules `name` imports anywhere in its source (a `from pkg import mod` counts
    as importing `pkg.mod` when that is a module, else `pkg`)."""
    found = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = name.split(".") if is_pkg else name.split(".")[:-1]
                here = here[: len(here) - (node.level - 1)]
                base = ".".join(here + ([node.module] if node.module else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                found.add(full if full in known else base)
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layering_violations(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in sorted(g.items()):
        pkg = package_of(mod)
        if pkg in TOP:
            continue
        allowed = ALLOWED.get(pkg)
        if allowed is None:
            bad.append(f"{mod}: package {pkg!r} has no place in tests/test_layering.py ALLOWED")
            continue
        for d in sorted(deps):
            dp = package_of(d)
            if dp != pkg and dp not in allowed and d != "captioner":
                bad.append(f"{mod} imports {d} ({pkg} may import only {sorted(allowed) or 'nothing of captioner'})")
    return bad


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_every_package_imports_only_the_layers_below_it():
    bad = layering_violations(graph())
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_checks_see_a_cycle_and_an_upward_import():
    """The two checks above on a made-up graph: they must not pass by seeing nothing."""
    g = {"captioner.core.a": {"captioner.core.b"}, "captioner.core.b": {"captioner.core.a"},
         "captioner.serving.x": {"captioner.modeling.model"}, "captioner.modeling.model": set()}
    assert cycles(g) == [["captioner.core.a", "captioner.core.b"]]
    assert layering_violations(g) == [
        "captioner.serving.x imports captioner.modeling.model (serving may import only ['core', 'io'])"]


def _torch_free_modules() -> list[str]:
    names = []
    for m in modules():
        if m.startswith(TORCH_FREE) and ".serving.triton." not in m:
            names.append(m)
    return names


def _loads_forbidden(names: list[str], forbidden: tuple[str, ...] = FORBIDDEN) -> list[str]:
    """The forbidden modules present after importing `names` in a fresh interpreter."""
    code = ("import importlib, json, sys\n"
            "for name in json.loads(sys.argv[1]): importlib.import_module(name)\n"
            f"forbidden = {forbidden!r}\n"
            "print(json.dumps(sorted(k for k in sys.modules if any(k == f or k.startswith(f + '.') for f in forbidden))))\n")
    r = subprocess.run([sys.executable, "-c", code, json.dumps(names)], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_torch_free_packages_import_without_torch_onnx_or_kfp():
    """All of them in one fresh interpreter; when something forbidden shows up, each module in its
    own interpreter, so the failure names the modules that pull it in."""
    names = _torch_free_modules()
    assert "captioner.core.config" in names and "captioner.serving.server.app" in names
    if not _loads_forbidden(names):
        return
    bad = {n: hit[:4] for n in names if (hit := _loads_forbidden([n]))}
    assert not bad, "torch-free modules that load forbidden modules:\n" + "\n".join(f"{k}: {v}" for k, v in bad.items())


def test_the_gateway_needs_neither_tokenizers_nor_onnxruntime():
    """The gateway image (docker/web.Dockerfile, the `web` extra) installs neither."""
    names = [m for m in modules() if m.startswith("captioner.web")]
    hit = _loads_forbidden(names, FORBIDDEN + GATEWAY_FORBIDDEN)
    assert not hit, f"captioner.web loads {hit[:6]}"


@pytest.mark.parametrize("pkg", sorted(ALLOWED))
def test_each_package_has_a_docstring_saying_what_it_holds(pkg):
    init = PACKAGE / pkg / "__init__.py"
    doc = ast.get_docstring(ast.parse(init.read_text()))
    assert doc and len(doc) > 20, f"{init} needs a docstring: what this package is and what it may import"


def test_the_layout_lists_every_package():
    pkgs = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert pkgs - TOP == set(ALLOWED), sorted(pkgs ^ set(ALLOWED))
