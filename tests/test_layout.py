"""The package's shape: no import circles, and the library never imports the orchestration above it."""

import ast
from pathlib import Path

import diffinv

ROOT = Path(diffinv.__file__).parent
TOP = ("diffinv.stages", "diffinv.study", "diffinv.launch", "diffinv.cli")  # orchestration: runs the library, never imported by it


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every diffinv module ``path`` imports, at the top or inside a function (a lazy import is still a dependency)."""
    found = set()
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            # "from diffinv import rng" names a module; "from diffinv.config import X" names its module.
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != "diffinv":
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    return {name: _imports(path, set(files)) - {name} for name, path in files.items()}


def test_the_graph_is_read_from_real_imports():
    graph = _graph()
    # A sanity check of the walker itself: edges that must exist are found.
    assert "diffinv.diffusion.backbone" in graph["diffinv.diffusion.inversion"]
    assert "diffinv.rng" in graph["diffinv.diffusion.sampling"]
    assert "diffinv.stages.invert" in graph["diffinv.launch"]


def test_no_import_circles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_library_never_imports_orchestration():
    graph = _graph()
    offenders = [f"{mod} imports {dep}" for mod, deps in graph.items() if not mod.startswith(TOP)
                 for dep in deps if dep.startswith(TOP)]
    assert not offenders, offenders


def test_functions_fit_on_a_screen():
    src = Path(diffinv.__file__).parent
    found = {}
    for path in src.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                found[f"{path.relative_to(src).as_posix()}:{node.name}"] = node.end_lineno - node.lineno + 1
    assert found == {}, f"functions over 80 lines (split them): {found}"


# Library modules that still take the generate stage's config; the list only shrinks.
TAKES_STAGE_CONFIG = {"diffinv.diffusion.generation"} | {
    f"diffinv.diffusion.methods.{m}" for m in ("base", "di", "di_lora", "img2img", "ddim_inversion", "prompt", "lora",
                                                "class_inversion", "retrieval")}


def test_the_library_takes_plain_settings_not_stage_configs():
    """diffusion/, classify/, quality/, data/ never import a stage's config class (constants and ConfigError are fine)."""
    found = set()
    for path in ROOT.rglob("*.py"):
        module = _module_name(path)
        if module.startswith(TOP) or module == "diffinv.config":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "diffinv.config":
                if any(a.name.endswith("Config") for a in node.names):
                    found.add(module)
    assert found <= TAKES_STAGE_CONFIG, f"library modules importing a stage config: {sorted(found - TAKES_STAGE_CONFIG)}"
    assert TAKES_STAGE_CONFIG <= found, f"no longer import one, drop from TAKES_STAGE_CONFIG: {sorted(TAKES_STAGE_CONFIG - found)}"
