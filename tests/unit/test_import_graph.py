"""The import graph between the package's folders has no cycle, and the kernel imports no stage.

Read from the source with ``ast`` (nothing is imported). Every import counts, wherever it stands:
a function-level (lazy) import or one under ``TYPE_CHECKING`` still makes one module need another,
so it would keep a cycle that only import time hides.

The folders, bottom to top:

    errors     adaptloop.errors: the exception tree. It lives in deploy/ but is a folder of its own here:
               it imports nothing of ours, so it can close no cycle, and every folder raises its errors
               (the contract's serde included). Counted as part of the kernel, the kernel's SDK
               (kernel -> schemas) and the serde's errors (schemas -> errors) would read as a cycle
               deploy <-> schemas that no import actually closes.
    schemas    adaptloop.schemas: the contract
    kernel     the rest of deploy/'s top level: settings, kafka, the SDK, the task catalogue, ...
    streams, trainers, serving   the stages
    bench      the benchmarks (each folder's ``bench`` subpackage):
               operator tools that start whole stacks
    ops        adaptloop.ops: the operator tools behind ``adaptloop`` (``adaptloop.cli`` names them as
               strings and imports them on demand, so the dispatcher adds no edge)

Not checked: strings that name a module (the CLI's table, a catalogue's ``module:function``).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Package -> the folder that holds it (pyproject.toml's package-dir).
FOLDERS = {"adaptloop": "deploy", "adaptloop.schemas": "schemas", "adaptloop.streams": "streams",
           "adaptloop.trainers": "trainers", "adaptloop.serving": "serving"}
STAGES = ("streams", "trainers", "serving")
#: What the kernel must never import: a stage, a benchmark or an operator tool.
ABOVE_KERNEL = (*STAGES, "bench", "ops")


def modules() -> dict[str, Path]:
    """Module name -> source file, for every module of the package."""
    found = {}
    for package, folder in FOLDERS.items():
        base = ROOT / folder
        for path in base.rglob("*.py"):
            parts = path.relative_to(base).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def folder_of(module: str) -> str:
    parts = module.split(".")
    if module == "adaptloop.errors":
        return "errors"
    if len(parts) > 1 and parts[1] in ("schemas", *STAGES):
        if "bench" in parts[2:]:
            return "bench"
        return parts[1]
    if len(parts) > 1 and parts[1] == "ops":
        return "ops"
    return "kernel"


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``module`` imports, anywhere in its file."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # ``from package import name``: a submodule when there is one, else a name of the package
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # ``import adaptloop.x.y`` names a module or its package
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def module_graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports_of(name, path, known) for name, path in found.items()}


def folder_edges(graph: dict[str, set[str]]) -> dict[tuple[str, str], list[str]]:
    """(importing folder, imported folder) -> the module imports that make the edge."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for module, imported in graph.items():
        for target in imported:
            a, b = folder_of(module), folder_of(target)
            if a != b:
                edges[(a, b)].append(f"{module} -> {target}")
    return edges


def cycles(edges) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    succ = defaultdict(set)
    for a, b in edges:
        succ[a].add(b)
    nodes = set(succ) | {b for _, b in edges}
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in succ[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_planted_cycle():
    assert cycles({("a", "b"): [], ("b", "c"): [], ("c", "a"): [], ("c", "d"): []}) == [["a", "b", "c"]]
    assert cycles({("a", "b"): [], ("b", "c"): []}) == []


def test_every_folder_is_found():
    assert {folder_of(m) for m in module_graph()} == {"errors", "schemas", "kernel", *STAGES, "bench", "ops"}


def test_no_cycle_between_folders():
    edges = folder_edges(module_graph())
    found = cycles(edges)
    why = [f"{a} -> {b}: {', '.join(sorted(edges[(a, b)])[:3])}"
           for component in found for (a, b) in sorted(edges) if a in component and b in component]
    assert not found, f"import cycles between folders {found}:\n" + "\n".join(why)


@pytest.mark.parametrize("above", ABOVE_KERNEL)
def test_the_kernel_imports_no_stage_and_no_tool(above):
    edges = folder_edges(module_graph())
    for below in ("errors", "schemas", "kernel"):
        assert (below, above) not in edges, f"{below} imports {above}: {sorted(edges[(below, above)])}"


@pytest.mark.parametrize("stage", STAGES)
def test_no_stage_imports_a_tool(stage):
    edges = folder_edges(module_graph())
    for tool in ("bench", "ops"):
        assert (stage, tool) not in edges, f"{stage} imports {tool}: {sorted(edges[(stage, tool)])}"


def test_no_cycle_between_modules_of_the_tools():
    """The operator tools import one another one way (report -> report_plots -> report_data, loop_bench -> demo)."""
    graph = module_graph()
    ops = {m: {t for t in imported if folder_of(t) == "ops"} for m, imported in graph.items() if folder_of(m) == "ops"}
    found = cycles({(m, t): [] for m, targets in ops.items() for t in targets})
    assert not found, f"import cycles between operator tools: {found}"
