"""The package's shape, checked from its source: no import circle, no long function, no method
name compared outside methods/. Imports inside functions count as edges too (they are run-time
dependencies all the same); only `if TYPE_CHECKING:` blocks are left out."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set

PACKAGE = Path(__file__).resolve().parents[1] / "mclfir_dist"
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> Dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node except those under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def imports_of(name: str, path: Path, known: Set[str]) -> Set[str]:
    """The package modules that `name` imports (a `from X import y` names X.y when y is a module)."""
    is_package = path.name == "__init__.py"
    out: Set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = {f"{target}.{a.name}" for a in node.names} & known
            out |= subs if subs else ({target} & known)
    out.discard(name)
    return out


def import_graph() -> Dict[str, Set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_the_import_graph_reads_relative_and_function_level_imports():
    graph = import_graph()
    assert "mclfir_dist.config" in graph["mclfir_dist.training.engine"]
    assert "mclfir_dist.training.engine" in graph["mclfir_dist.cli"]   # imported inside a function


def test_the_package_import_graph_is_acyclic():
    cycle = find_cycle(import_graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_no_function_is_longer_than_60_lines():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name} ({lines} lines)")
    assert not long, "functions over 60 lines: " + ", ".join(long)


def test_no_method_name_is_compared_outside_methods():
    """What a method does is asked of the method (its plan, its properties), never of its name."""
    from mclfir_dist.methods import METHODS
    names = set(METHODS.names())
    found = []
    for name, path in modules().items():
        if name.startswith("mclfir_dist.methods"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                consts = [c for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                consts += [e for c in node.comparators if isinstance(c, (ast.Tuple, ast.List, ast.Set))
                           for e in c.elts if isinstance(e, ast.Constant)]
                hit = [c.value for c in consts if c.value in names]
                if hit and "method" in ast.unparse(node):   # trunk_bn == "frozen" is not a method
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} compares with {hit[0]!r}")
    assert not found, "; ".join(found)


def test_importing_the_search_api_and_the_service_loads_no_training_stack():
    """`import mclfir_dist.retrieval.api` used to load 40 package modules (every method, webdataset) in 2.6 s;
    key and vector searches need numpy and FAISS only. (Loading a run's model imports no training either:
    tests/test_api.py.)"""
    import subprocess
    import sys
    probe = ("import sys, mclfir_dist.retrieval.api, mclfir_dist.retrieval.search, mclfir_dist.retrieval.batch, "
             "mclfir_dist.serve.app\n"
             "heavy = ('mclfir_dist.methods', 'mclfir_dist.training', 'webdataset', 'nvidia.dali', 'deepspeed', "
             "'torch', 'accelerate')\n"
             "print(sorted({m for m in sys.modules if m.startswith(heavy)}))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout


# Folders (and top-level modules) by layer, bottom up: a module imports its own layer or lower, never higher.
LAYERS = [
    {"errors", "version", "utils"},
    {"runfolder"},                    # a run's layout and results.json: what training writes and the rest read
    {"config", "registry", "plugins"},
    {"model", "data"},
    {"methods"},                      # with their losses, optimizer and schedules
    {"configure"},                    # the registries filled: every family below, then the plug-ins
    {"evaluation"},
    {"training"},
    {"retrieval", "serve", "mclfir_dist"},
    {"bench", "study", "tune"},
    {"cli", "train"},                 # the entry points: `mclfir`, `python -m mclfir_dist.train`
]


def folder_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def layer_of(module: str) -> int:
    folder = folder_of(module)
    found = [i for i, names in enumerate(LAYERS) if folder in names]
    assert found, f"{module}: its folder {folder!r} has no layer in tests/test_architecture.py LAYERS"
    return found[0]


def test_folders_import_one_way_from_the_bottom_up():
    """training <-> evaluation, training <-> methods (the losses) and training <-> configure imported each other
    as folders, which the module-level cycle check could not see."""
    upward = sorted(f"{a} -> {b}" for a, targets in import_graph().items() for b in targets
                    if layer_of(b) > layer_of(a))
    assert not upward, "imports that go up a layer: " + "; ".join(upward)
    folders: Dict[str, Set[str]] = {}
    for a, targets in import_graph().items():
        folders.setdefault(folder_of(a), set()).update(folder_of(b) for b in targets if folder_of(b) != folder_of(a))
    for f in {t for ts in folders.values() for t in ts}:
        folders.setdefault(f, set())
    cycle = find_cycle(folders)
    assert not cycle, "folders import each other: " + " -> ".join(cycle)


def test_only_the_runfolder_package_spells_a_run_folders_file_names():
    """Training writes and evaluation, retrieval, the CLI and the studies read a run through
    mclfir_dist/runfolder (RunFolder): no other module spells results.json, config.yaml, checkpoints..."""
    import ast
    from mclfir_dist.runfolder import layout
    names = {layout.RESULTS, layout.CONFIG, layout.SUMMARY, layout.CHECKPOINTS, layout.GRIDS, layout.LOCK}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name == "runfolder":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.value!r}")
    assert not found, "run-folder names spelled outside mclfir_dist/runfolder: " + "; ".join(found)
