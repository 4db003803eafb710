"""The package's import graph, read from the source with `ast`: no import circle among treeflash modules, and no
treeflash module imported inside a function (a function-level import is how a circle hides). Optional
third-party packages may still be imported inside functions (uvicorn, starlette, matplotlib, ...)."""

import ast
from pathlib import Path

import treeflash

ROOT = Path(treeflash.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    """Module name -> file, for every module of the package (a package's name -> its __init__.py)."""
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = ("treeflash", *path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> list[str]:
    """The treeflash modules an `import from` names: `from .x import y` is x, or x.y when y is a submodule."""
    if node.level:
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = package[: len(package) - (node.level - 1)]
        target = ".".join(base + (node.module.split(".") if node.module else []))
    else:
        target = node.module or ""
    if target != "treeflash" and not target.startswith("treeflash."):
        return []
    found = []
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        found.append(sub if sub in MODULES else target)
    return found


def _imports(module: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported treeflash module, line, inside a function) for every import statement of a module."""
    tree = ast.parse(path.read_text(), str(path))
    out = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name == "treeflash" or alias.name.startswith("treeflash."):
                        out.append((alias.name, child.lineno, in_function))
            elif isinstance(child, ast.ImportFrom):
                out.extend((target, child.lineno, in_function) for target in _resolve(module, path, child))
            visit(child, inner)

    visit(tree, False)
    return out


def _graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        graph[module] = {target for target, _, _ in _imports(module, path) if target in MODULES and target != module}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_package_is_found_whole():
    assert {"treeflash", "treeflash.api", "treeflash.cli", "treeflash.train.loop", "treeflash.serve.app",
            "treeflash.bench.metrics"} <= set(MODULES)


def test_no_import_circle():
    cycle = _cycle(_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_treeflash_module_is_imported_inside_a_function():
    hidden = [f"{MODULES[module].relative_to(ROOT.parent)}:{line} imports {target}"
              for module in MODULES for target, line, in_function in _imports(module, MODULES[module]) if in_function]
    assert not hidden, "function-level imports of treeflash modules (move them to the top):\n" + "\n".join(hidden)


def test_the_inference_core_does_not_import_its_applications():
    """The flat modules (targets, drafters, decoding, ...) know nothing of training, serving, benchmarks or the
    CLI, which are built on them."""
    applications = ("treeflash.train", "treeflash.serve", "treeflash.bench", "treeflash.cli")
    core = [m for m in MODULES if m.count(".") == 1 and m.split(".")[1] not in ("train", "serve", "bench", "cli")]
    wrong = [f"{module} imports {target}" for module in core for target, _, _ in _imports(module, MODULES[module])
             if target.startswith(applications)]
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_circles_and_relative_imports(tmp_path):
    """The graph code on a hand-made case: a circle through a package's __init__ and a `from . import x`."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    node = ast.parse("from . import loop").body[0]
    assert _resolve("treeflash.train.records", ROOT / "train" / "records.py", node) == ["treeflash.train.loop"]
    node = ast.parse("from ..decoding import DecodeConfig").body[0]
    assert _resolve("treeflash.cli.bench", ROOT / "cli" / "bench.py", node) == ["treeflash.decoding"]
    node = ast.parse("from . import main").body[0]
    assert _resolve("treeflash.cli.__main__", ROOT / "cli" / "__main__.py", node) == ["treeflash.cli"]
    node = ast.parse("from .train import distributed").body[0]
    assert _resolve("treeflash", ROOT / "__init__.py", node) == ["treeflash.train.distributed"]
