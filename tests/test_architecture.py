"""The packages' shape, checked from their source: two layers, the runtime ``fedseg`` (what a site and the server
run) and the tooling ``fedseg_tools`` (benchmark, baselines runner, demo, simulator runner, CLI, POC environments)
that imports it and is never imported by it; no import cycles in either; ``methods/`` is site-side only.

The import graph is built from the AST of every module under custom/fedseg and custom/fedseg_tools. It counts top-level AND function-level
imports (also those under ``if TYPE_CHECKING``, ``try`` or a class body): an import moved into a function to dodge
a load-order error is still a dependency in both directions, and two modules that need each other are one module
split in the wrong place. An edge goes to the module named; ``from pkg import name`` goes to ``pkg.name`` when that
is a submodule, else to ``pkg``. Parent packages that Python initialises on the way are not edges of their own: a
package's ``__init__`` is listed as a module with its own imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

CUSTOM_DIR = Path(__file__).resolve().parents[1] / "custom"
PACKAGE_DIR = CUSTOM_DIR / "fedseg"
PACKAGE = "fedseg"
RUNTIME, TOOLING = "fedseg", "fedseg_tools"
PACKAGES = {RUNTIME: PACKAGE_DIR, TOOLING: CUSTOM_DIR / TOOLING}


def module_name(path: Path, package_dir: Path = PACKAGE_DIR, package: str = PACKAGE) -> str:
    parts = list(path.relative_to(package_dir).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def package_modules(package_dir: Path = PACKAGE_DIR, package: str = PACKAGE) -> dict[str, Path]:
    return {module_name(p, package_dir, package): p for p in sorted(package_dir.rglob("*.py"))}


def _absolute(importer: str, is_package: bool, level: int, module: str | None) -> str:
    """The absolute name of ``from <level dots><module> import ...`` written in ``importer``."""
    if level == 0:
        return module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _in_package(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def import_graph(packages: dict[str, Path] = PACKAGES) -> dict[str, set[str]]:
    """module -> the modules of the packages it imports anywhere in its source (top level or inside functions)."""
    modules = {
        name: path for package, package_dir in packages.items() for name, path in package_modules(package_dir, package).items()
    }
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(name, is_package, node.level, node.module)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in targets:
                package = next((p for p in packages if _in_package(target, p)), None)
                if package:
                    if target not in modules:
                        raise AssertionError(f"{path}: imports {target}, which is no module of {package}")
                    if target != name:
                        graph[name].add(target)
    return graph


def import_tangles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan): modules that all reach each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
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
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle per tangle, as a closed path [a, b, a]."""
    return [_closed_path(graph, set(c)) for c in import_tangles(graph)]


def _closed_path(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module, e.g. [a, b, a]."""
    start = min(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt_frontier = []
        for node in frontier:
            for nxt in sorted(graph[node] & component):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if nxt not in previous:
                    previous[nxt] = node
                    nxt_frontier.append(nxt)
        frontier = nxt_frontier
    raise AssertionError(f"no cycle through {start}")


def test_find_cycles_names_the_cycle(tmp_path):
    """The checker itself: a three-module cycle through a function-level import and a relative import is found."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from . import c\n")
    (pkg / "sub" / "c.py").write_text("import pkg.a\n")
    (pkg / "d.py").write_text("from pkg import a\n")
    graph = import_graph({"pkg": pkg})
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.sub.c"} and graph["pkg.d"] == {"pkg.a"}
    assert find_cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.sub.c", "pkg.a"]]
    (pkg / "sub" / "c.py").write_text("import os\n")
    assert find_cycles(import_graph({"pkg": pkg})) == []


def runtime_to_tooling(graph: dict[str, set[str]], runtime: str = RUNTIME, tooling: str = TOOLING) -> list[str]:
    """Every import of the tooling layer by the runtime layer ("importer -> imported")."""
    return sorted(
        f"{name} -> {target}"
        for name, targets in graph.items()
        if _in_package(name, runtime)
        for target in targets
        if _in_package(target, tooling)
    )


def test_the_layer_check_finds_a_runtime_module_that_imports_tooling(tmp_path):
    """The checker itself: a function-level import of the tooling by the runtime is found; tooling -> runtime is not."""
    for name in ("rt", "rt_tools"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / "rt" / "core.py").write_text("def f():\n    from rt_tools import bench\n")
    (tmp_path / "rt_tools" / "bench.py").write_text("from rt import core\n")
    graph = import_graph({"rt": tmp_path / "rt", "rt_tools": tmp_path / "rt_tools"})
    assert runtime_to_tooling(graph, "rt", "rt_tools") == ["rt.core -> rt_tools.bench"]
    assert find_cycles(graph) == [["rt.core", "rt_tools.bench", "rt.core"]]  # the function-level import makes a cycle
    (tmp_path / "rt" / "core.py").write_text("import os\n")
    assert runtime_to_tooling(import_graph({"rt": tmp_path / "rt", "rt_tools": tmp_path / "rt_tools"}), "rt", "rt_tools") == []


def test_the_runtime_never_imports_the_tooling():
    found = runtime_to_tooling(import_graph())
    assert not found, "the runtime (what sites and the server run) imports tooling:\n" + "\n".join(found)


def test_no_import_cycles_in_fedseg():
    graph = import_graph()
    tangles = import_tangles(graph)
    assert not tangles, "import cycles in fedseg / fedseg_tools (top-level and function-level imports):\n" + "\n".join(
        f"{' -> '.join(_closed_path(graph, set(t)))}   (modules that import each other: {', '.join(t)})" for t in tangles
    )


def _imported_names(path: Path, prefix: str) -> set[str]:
    """Names a module imports (anywhere) from modules whose name starts with `prefix`."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(prefix):
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith(prefix))
    return names


# what the server takes from methods/: the definition of the network the sites train (FedSM's selector: its
# settings and constructor, to create the first one), never a routine of the method
SHARED_METHOD_DEFINITIONS = {
    f"fedseg.methods.fedsm.{n}"
    for n in ("DEFAULT_SELECTOR", "GAMMA_SWEEP", "SELECTOR_INPUT", "SelectorSettings", "build_selector")
}


def test_methods_are_site_side_and_algorithms_are_pure():
    server_side = sorted(PACKAGE_DIR.glob("fl/*_controller.py"))
    assert server_side, "no controllers found"
    for path in server_side:
        taken = _imported_names(path, "fedseg.methods")
        assert taken <= SHARED_METHOD_DEFINITIONS, (
            f"{path.name} takes site-side routines from methods/: {taken - SHARED_METHOD_DEFINITIONS}"
        )
    graph = import_graph()
    for name, targets in graph.items():
        if name.startswith("fedseg.methods"):
            assert not {t for t in targets if t.startswith("fedseg.fl")}, f"{name} imports FLARE glue: {targets}"
        if name.startswith("fedseg.algorithms"):
            outside = {t for t in targets if not t.startswith("fedseg.algorithms")}
            assert not outside, f"{name} (pure math) imports {outside}"


def test_the_engine_knows_nothing_about_flare():
    for path in sorted((PACKAGE_DIR / "engine").rglob("*.py")):
        taken = _imported_names(path, "nvflare")
        assert not taken, f"engine/{path.relative_to(PACKAGE_DIR / 'engine')} imports from NVFlare: {sorted(taken)}"
