"""The layering of the code, read from its imports (``ast``: module-level and function-level
imports both count; ``if TYPE_CHECKING:`` imports do not, they never run).

From the bottom up:
  platform  maca_compat            imports none of ours
  ops       ops                    imports ops and the platform (its device seam) only
  parallel  parallel               imports parallel and the SP context (ops.comm) only: the
                                   sequence-parallel ops live in ops/, beside their op
  model     sbtrain.model, sbtrain.spiking (the neuron)
                                   imports parallel, ops, the platform and the plain
                                   definitions (sbtrain.config, sbtrain.errors) only
  top       the trainer, tools (CLI, spikestats, convert, generate)
                                   nothing below imports them
and no two of our modules import each other in a circle at module level.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("maca_compat", "ops", "parallel", "sbtrain")
DEFINITIONS = ("sbtrain.config", "sbtrain.errors")
TOP = ("sbtrain.trainer", "sbtrain.trainer_setup", "sbtrain.train", "sbtrain.cli",
       "sbtrain.tools", "sbtrain.convert", "sbtrain.generate")  # generate: `sbtrain generate`
# May import only these (besides itself); the first match of the module's name decides.
ALLOWED = {
    "maca_compat": (),
    "ops": ("maca_compat",),
    "parallel": ("ops.comm",),
    "sbtrain.model": ("sbtrain.spiking", "parallel", "ops", "maca_compat", *DEFINITIONS),
    "sbtrain.spiking": ("sbtrain.model", "parallel", "ops", "maca_compat", *DEFINITIONS),
}
# Known exceptions, each with its reason; the test fails when one is fixed (remove it here).
KNOWN = {
    ("sbtrain.observe", "sbtrain.tools.plot"):
        "RunObserver draws metrics.png at the end of a run with the `sbtrain plot` code "
        "(issue 19); the figure code belongs below the tools",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool, top_level_only: bool) -> set[str]:
    """Our modules that ``module`` imports (resolved, relative imports included)."""
    found: set[str] = set()

    def visit(node: ast.AST, depth: int) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # "from pkg import sub" imports the submodule pkg.sub (resolved later), else pkg
            found.update(f"{target}.{alias.name}" for alias in node.names)
        nested = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        if nested and top_level_only:
            return
        for child in ast.iter_child_nodes(node):
            visit(child, depth + nested)

    visit(tree, 0)
    return {name for name in found if name.split(".")[0] in PACKAGES}


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    trees = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            trees[_module_name(path)] = (ast.parse(path.read_text()), path.name == "__init__.py")
    known = set(trees)

    def resolve(name: str) -> str | None:
        # "a.b.c" may name a module or a definition inside module "a.b"
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, (tree, is_package) in trees.items():
        targets = {resolve(name) for name in _imports(tree, module, is_package, top_level_only)}
        graph[module] = {t for t in targets if t and t != module}
    return graph


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _violations() -> set[tuple[str, str]]:
    bad = set()
    for module, targets in _graph(top_level_only=False).items():
        layer = next((p for p in sorted(ALLOWED, key=len, reverse=True) if _within(module, p)),
                     None)
        for target in targets:
            if layer is not None and not _within(target, layer) and not any(
                    _within(target, allowed) for allowed in ALLOWED[layer]):
                bad.add((module, target))
            below_top = not any(_within(module, top) for top in TOP)
            if below_top and any(_within(target, top) for top in TOP):
                bad.add((module, target))
    return bad


def test_every_layer_imports_only_the_layers_below():
    bad = _violations()
    new = sorted(bad - set(KNOWN))
    assert not new, "imports against the layering (see this file's docstring):\n" + "\n".join(
        f"  {a} -> {b}" for a, b in new)


def test_known_exceptions_are_still_real():
    fixed = sorted(set(KNOWN) - _violations())
    assert not fixed, f"fixed, so remove from KNOWN: {fixed}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return out


def test_no_import_circles_at_module_level():
    assert _cycles(_graph(top_level_only=True)) == []


def test_the_circle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("module,target", [("ops.documents", "sbtrain.model.segments"),
                                           ("ops.gla.sequence_parallel", "sbtrain.model"),
                                           ("parallel.sequence", "ops.attention")])
def test_the_checker_sees_a_wrong_way_import(module, target, monkeypatch):
    """The rules reject an import from a lower layer into a higher one (the check can fail)."""
    real = _graph

    def with_extra(top_level_only):
        graph = real(top_level_only)
        graph.setdefault(module, set()).add(target)
        return graph

    monkeypatch.setitem(globals(), "_graph", with_extra)
    assert (module, target) in _violations()
