"""The package's import graph: one-way arrows (docs/layout.md), every module importable alone.

The graph is read from the source (top-level *and* function-level imports), so a lazy
import that hides a cycle from the interpreter still counts as an arrow back, and so does
a lazy import that runs up the layers.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "nanoseek"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _resolve(name: str) -> str | None:
    """The longest known module that `name` (a module or a name inside one) refers to."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}".rstrip(".")
            names = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {m for n in names if n.startswith("nanoseek") and (m := _resolve(n)) and m != module}
    return out


GRAPH = {m: _imports(m) for m in MODULES}


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
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

    for v in GRAPH:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    assert _cycles() == []


# The one-way map, lowest layer first: a module imports from its own package and from the
# packages below it, never from one above. `""` is the package's face (nanoseek/__init__.py:
# from_pretrained, __version__), which the CLI reads; calc reads only configs (test below).
LAYERS = ["config", "text", "calc", "quant", "checkpoint", "model", "data", "parallel", "engine",
          "train", "reports", "recipes", "agent", "serve", "", "cli", "__main__"]
# Inside train/: the loop's vocabulary, then how its arithmetic runs, the run directory, the
# loop and the stages built on it.
TRAIN_LAYERS = [{"config", "fields", "schedule", "targets"}, {"numerics"}, {"run"},
                {"", "loop", "eval", "pretrain"}, {"posttrain"}, {"rl"}]


def _part(module: str, depth: int) -> str:
    """The package (or module) at `depth` below nanoseek: _part("nanoseek.train.rl.grpo", 2) == "rl"."""
    parts = module.split(".")
    return parts[depth] if len(parts) > depth else ""


def _rank(layers: list, name: str) -> int:
    return next(i for i, layer in enumerate(layers) if name == layer or isinstance(layer, set) and name in layer)


def _arrows_up(within: str, depth: int, layers: list) -> list[str]:
    return sorted(f"{m} -> {d}" for m, deps in GRAPH.items() if m.startswith(within)
                  for d in deps if d.startswith(within)
                  and _rank(layers, _part(m, depth)) < _rank(layers, _part(d, depth)))


def test_every_package_has_a_layer():
    tops = {_part(m, 1) for m in MODULES}
    assert tops <= set(LAYERS), sorted(tops - set(LAYERS))
    subs = {_part(m, 2) for m in MODULES if m.startswith("nanoseek.train")}
    assert subs <= set().union(*TRAIN_LAYERS), sorted(subs - set().union(*TRAIN_LAYERS))


def test_imports_point_down():
    """No import, even inside a function, from a lower layer to a higher one."""
    assert _arrows_up("nanoseek", 1, LAYERS) == []
    assert _arrows_up("nanoseek.train", 2, TRAIN_LAYERS) == []


def test_calc_reads_only_config():
    bad = {m: sorted(d) for m, d in GRAPH.items() if m.startswith("nanoseek.calc")
           and any(_part(x, 1) not in ("calc", "config") for x in d)}
    assert bad == {}


def test_checkpoint_knows_nothing_of_the_model():
    """The checkpoint code is handed the model class (`CausalLM.from_pretrained`), so the
    model may import it: checkpoint -> model would close a cycle."""
    bad = {m: sorted(d) for m, d in GRAPH.items() if m.startswith("nanoseek.checkpoint")
           and any(x.startswith("nanoseek.model") for x in d)}
    assert bad == {}


def test_the_layer_test_sees_an_arrow_up(monkeypatch):
    """Guards the test itself: a lazy import of the CLI from the model is caught."""
    monkeypatch.setitem(GRAPH, "nanoseek.model.transformer",
                        GRAPH["nanoseek.model.transformer"] | {"nanoseek.cli.common"})
    assert _arrows_up("nanoseek", 1, LAYERS) == ["nanoseek.model.transformer -> nanoseek.cli.common"]


def test_graph_sees_lazy_imports():
    """The reader above would catch a function-level import (guards the test itself)."""
    src = "def f():\n    from nanoseek.checkpoint.hf import save_pretrained\n"
    names = {n.module for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ImportFrom)}
    assert names == {"nanoseek.checkpoint.hf"}


def test_every_module_imports_in_a_fresh_interpreter():
    """All modules import in one new interpreter."""
    mods = sorted(m for m in MODULES if not m.endswith("__main__"))
    code = ("import importlib\n"
            f"for m in {mods!r}: importlib.import_module(m)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PKG.parent)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.endswith("__main__")))
def test_each_module_imports_alone(module):
    """Each module imports with nothing imported before it (catches order-dependent imports)."""
    r = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True,
                       cwd=PKG.parent)
    assert r.returncode == 0, r.stderr[-2000:]
