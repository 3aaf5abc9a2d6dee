"""The package's shape: no import circles, and the library never imports the orchestration above it."""

import ast
import re
from pathlib import Path

import diffinv

ROOT = Path(diffinv.__file__).parent
TOP = ("diffinv.stages", "diffinv.study", "diffinv.launch", "diffinv.cli")  # orchestration: runs the library, never imported by it


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every diffinv module ``path`` imports, at the top, inside a function or by name (a lazy import is still a dependency)."""
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
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"diffinv(\.\w+)+:\w+", node.value):
            names = [node.value.partition(":")[0]]  # "module:attribute", imported by name when used (the stage catalog)
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
    assert "diffinv.study.experiment" in graph["diffinv.launch"]


def _circle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle of ``graph`` (its nodes in order, the first repeated last), or [] if there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def _packages(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The module graph seen from above: diffinv.stages.invert -> diffinv.stages; top-level modules stay themselves."""
    def package(module: str) -> str:
        return ".".join(module.split(".")[:2])
    collapsed: dict[str, set[str]] = {}
    for module, deps in graph.items():
        collapsed.setdefault(package(module), set()).update(package(d) for d in deps)
    return {k: v - {k} for k, v in collapsed.items()}


def test_no_import_circles():
    assert _circle(_graph()) == []


def test_no_circle_between_packages():
    graph = _packages(_graph())
    assert "diffinv.stages" in graph["diffinv.study"]  # a study drives the stages ...
    assert _circle(graph) == []  # ... and no stage imports a study, even inside a function
    # The check sees a loop the module-level one cannot: a stage importing a study module that imports no stage.
    looped = _graph()
    looped["diffinv.stages.verify"] = looped["diffinv.stages.verify"] | {"diffinv.study.estimate"}
    assert _circle(looped) == [] and _circle(_packages(looped))[:1] in (["diffinv.stages"], ["diffinv.study"])


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


def _external_imports(path: Path) -> set[str]:
    """The top-level packages outside diffinv that ``path`` imports, lazily or not."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


DIFFUSERS_ADAPTER = {"diffinv.diffusion.backbone", "diffinv.diffusion.model_io",  # the model interface; reading and writing
                     "diffinv.diffusion.process",  # the noise processes and their samplers (diffusers schedulers)
                     "diffinv.diffusion.pretrain", "diffinv.diffusion.tiny"}  # building new models from diffusers' classes


def test_one_narrow_adapter_owns_diffusers():
    users = {_module_name(p) for p in ROOT.rglob("*.py") if "diffusers" in _external_imports(p)}
    assert "diffinv.diffusion.model_io" in users  # the walker finds lazy imports
    outside = sorted(users - DIFFUSERS_ADAPTER)
    assert not outside, f"modules importing diffusers outside the adapter (go through Backbone): {outside}"


LIBRARY = ("diffinv.diffusion", "diffinv.classify", "diffinv.quality", "diffinv.data")


def _library_trees():
    for path in ROOT.rglob("*.py"):
        if _module_name(path).startswith(LIBRARY):
            yield _module_name(path), ast.parse(path.read_text())


def test_the_library_takes_plain_settings_not_stage_configs():
    """diffusion/, classify/, quality/, data/ never import a stage's config class (constants and ConfigError are fine)."""
    found = sorted(module for module, tree in _library_trees() for node in ast.walk(tree)
                   if isinstance(node, ast.ImportFrom) and node.module == "diffinv.config"
                   and any(a.name.endswith("Config") for a in node.names))
    assert not found, f"library modules importing a stage config (take a settings dataclass instead): {found}"


def test_the_library_never_opens_run_folders():
    """The library never reads a stage's run files (its config.yaml, another stage's marker): the stages hand it what they hold."""
    run_files = {"config.yaml", "finetune.json", "train.json", "pretrain.json", "study.yaml"}
    found = sorted(f"{module}: / {node.right.value!r}" for module, tree in _library_trees() for node in ast.walk(tree)
                   if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant)
                   and node.right.value in run_files)
    found += sorted(f"{module} imports read_yaml" for module, tree in _library_trees() for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module == "diffinv.runs"
                    and any(a.name == "read_yaml" for a in node.names))
    assert not found, f"library modules reading run folders (open them in the stage): {found}"


# The DDPM vocabulary: the noise process module owns it (diffinv.diffusion.process); everything else asks the
# model's process to noise, target, read back, sample and invert, so a rectified-flow model takes the same paths.
DDPM_NAMES = {"alphas_cumprod", "final_alpha_cumprod", "alpha_bar", "q_sample", "eps_and_x0", "ddim_invert", "init_noise_sigma"}
PROCESS_USERS = ("diffinv.diffusion.inversion", "diffinv.diffusion.sampling", "diffinv.diffusion.lora",
                 "diffinv.diffusion.objective", "diffinv.diffusion.methods", "diffinv.study.estimate")


def _names(source: str) -> set[str]:
    import io
    import tokenize

    return {tok.string for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.NAME}


def test_the_ddpm_vocabulary_stays_in_its_process_module():
    assert _names("x = backbone.alphas_cumprod[t]  # alpha_bar\n") & DDPM_NAMES == {"alphas_cumprod"}  # code, not comments
    found = {}
    for path in ROOT.rglob("*.py"):
        name = _module_name(path)
        if name == "diffinv.diffusion.process":
            continue
        names = _names(path.read_text())
        banned = DDPM_NAMES | ({"prediction_type"} if name.startswith(PROCESS_USERS) else set())
        if names & banned:
            found[name] = sorted(names & banned)
    assert not found, f"DDPM names outside diffinv.diffusion.process (ask backbone.process instead): {found}"
