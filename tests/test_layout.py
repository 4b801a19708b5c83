"""The package's layout holds: no import loops, and lower layers never import upper ones."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import kvstash

PACKAGE = Path(kvstash.__file__).parent
# each folder (or top module) may import only from the layers listed after it
LAYERS = {
    "cache": set(),
    "model": {"cache"},
    "store": {"cache"},
    "prompt": set(),
    "sampling": set(),
    "detok": set(),
    "splitting": {"prompt"},
    "reuse": {"cache", "model", "store", "prompt"},
    "compress": {"cache", "model"},
    "decoding": {"detok", "sampling", "reuse"},
    "speculate": {"cache", "model", "sampling", "detok", "decoding", "reuse"},
    "batch": {"cache", "model", "store", "prompt", "sampling", "detok", "decoding", "reuse", "compress", "speculate"},
    "engine": {
        *("cache", "model", "store", "prompt", "sampling", "detok", "decoding", "splitting", "reuse", "compress"),
        *("batch", "speculate"),
    },
}


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PACKAGE.rglob("*.py"):
        name = ".".join(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = f
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports (at any depth of its code, typing-only imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in mods:
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("kvstash.") and path.name != "__init__.py":
                out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def test_no_import_loops() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import loop: " + " -> ".join(path[path.index(nxt) :] + [nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_lower_layers_never_import_upper_ones() -> None:
    wrong = []
    for name, targets in _graph().items():
        layer = name.split(".")[1] if "." in name else None
        if layer not in LAYERS:
            continue
        for t in targets:
            other = t.split(".")[1]
            if other != layer and other not in LAYERS[layer]:
                wrong.append(f"{name} imports {t}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(
    ("module", "registry", "names"),
    [
        ("kvstash.store.codec_registry", "CODECS", ["bf16", "fp16", "fp32", "kivi2", "kivi4", "kivi8"]),
        ("kvstash.reuse.registry", "REUSE_METHODS", ["blend", "cacheblend", "full", "naive", "prefix"]),
        ("kvstash.compress.evict", "POLICIES", ["h2o", "snapkv", "streaming"]),
    ],
)
def test_registries_are_full_when_imported_alone(module: str, registry: str, names: list[str]) -> None:
    """Registries are filled explicitly, not by importing other modules for their side effects: a fresh
    interpreter that imports only the registry's module sees every name."""
    code = f"import {module} as m; print(','.join(sorted(m.{registry})))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().split(",") == names
