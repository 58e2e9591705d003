"""The layers of the package, read from the source: every import statement (at module level and
inside functions) names only modules of its own layer or below, the only cycle is the declared
pair (the primitive table and its checked operations), and the engine imports nothing lazily.
ARCHITECTURE.md draws the same layers."""

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.backends("numpy")

ROOT = Path(__file__).resolve().parents[1]

#: bottom up; a module may import modules of its own layer (without cycles) or of lower ones
LAYERS = [
    ("backends", ["miniresnet.backends*", "miniresnet.files"]),
    ("backend choice", ["miniresnet.backend_choice"]),
    ("tracing", ["miniresnet.tracing"]),
    ("creation", ["miniresnet.creation"]),
    ("primitives", ["miniresnet.ops", "miniresnet.primitives"]),
    ("transforms", ["miniresnet.transforms"]),
    ("normalization", ["miniresnet.normalization"]),
    ("functional", ["miniresnet.functional"]),
    ("the public API", ["miniresnet"]),
    ("networks", ["miniresnet.nn*"]),
    ("training", ["miniresnet.optim", "miniresnet.data", "miniresnet._cli",
                  "miniresnet.checkpoint", "miniresnet.train"]),
    ("inspection", ["miniresnet.inspect*", "miniresnet.instruments"]),
    ("harness", ["miniresnet.experiments*", "miniresnet.demo", "miniresnet.bench*",
                 "miniresnet.testing*"]),
]
ENGINE = {"backends", "backend choice", "tracing", "creation", "primitives", "transforms",
          "normalization", "functional"}
DECLARED_CYCLE = {"miniresnet.ops", "miniresnet.primitives"}


def _modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name (``backends/`` is installed as
    ``miniresnet.backends``)."""
    found = {}
    for base, prefix in ((ROOT / "miniresnet", "miniresnet"), (ROOT / "backends",
                                                                "miniresnet.backends")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([prefix, *parts])] = path
    return found


MODULES = _modules()


def _layer(module: str) -> int:
    for i, (_, patterns) in enumerate(LAYERS):
        for p in patterns:
            if module == p or p.endswith("*") and (module == p[:-1]
                                                   or module.startswith(p[:-1] + ".")):
                return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and ARCHITECTURE.md)")


def _imports(module: str, path: Path) -> list[tuple[str, bool]]:
    """``(imported miniresnet module, inside a function?)`` for every import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def visit(node, nested):
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                found.extend((a.name, inner) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - child.level + 1] + ([base] if base
                                                                            else []))
                for a in child.names:  # a submodule if it is one, else a name of `base`
                    sub = f"{base}.{a.name}"
                    found.append((sub if sub in MODULES else base, inner))
            visit(child, inner)

    visit(tree, False)
    return [(m, inner) for m, inner in found if m == "miniresnet" or
            m.startswith("miniresnet.")]


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_only_its_layer_or_below(module):
    mine = _layer(module)
    above = sorted({m for m, _ in GRAPH[module] if _layer(m) > mine})
    assert not above, (f"{module} ({LAYERS[mine][0]}) imports from higher layers: "
                       f"{', '.join(f'{m} ({LAYERS[_layer(m)][0]})' for m in above)}")


@pytest.mark.parametrize("module", sorted(m for m in MODULES if LAYERS[_layer(m)][0] in ENGINE))
def test_the_engine_imports_nothing_lazily(module):
    lazy = sorted({m for m, inner in GRAPH[module] if inner})
    assert not lazy, f"{module} imports {', '.join(lazy)} inside a function"


def test_the_only_cycle_is_the_declared_pair():
    edges = {m: {d for d, _ in GRAPH[m] if d != m} for m in MODULES}
    # Tarjan's strongly connected components, iteratively
    index, low, on, stack, comps, counter = {}, {}, set(), [], [], [0]
    for root in MODULES:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = set()
                while True:
                    m = stack.pop()
                    on.discard(m)
                    comp.add(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    comps.append(comp)
    assert comps == [DECLARED_CYCLE], f"import cycles: {comps}"


def test_every_layer_has_modules_and_architecture_lists_them():
    text = (ROOT / "ARCHITECTURE.md").read_text()
    for name, patterns in LAYERS:
        assert any(_layer(m) == LAYERS.index((name, patterns)) for m in MODULES), name
        assert name in text, f"ARCHITECTURE.md does not name the layer {name!r}"
