"""Imports point one way: core ← models ← sampling / sharding ← algorithms / envs ← run ← command lines,
with no cycles and no import inside a function to dodge one (as test_model_import.py guards torch)."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jaxrl_llm"
# Lowest first; a module may import modules of its own layer (without cycles) or of a lower one.
LAYERS = (
    ("errors", "padding", "core", "compiles"),
    ("models", "tokenizer", "rewards", "state", "metrics", "checkpoint", "compare"),
    ("data",),
    ("config",),
    ("sampling", "sharding"),
    ("algorithms", "envs"),
    ("run",),
    ("cli", "eval", "plot", "sweep", "export", "__init__"),
)
COMMAND_LINES = ("jaxrl_llm.cli", "jaxrl_llm.eval", "jaxrl_llm.plot", "jaxrl_llm.sweep", "jaxrl_llm.export",
                 "jaxrl_llm")


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for level, names in enumerate(LAYERS):
        if top in names:
            return level
    raise AssertionError(f"{module} is in no layer; add its package to LAYERS")


def imports(path: pathlib.Path):
    """(imported jaxrl_llm module, line, whether inside a function) of every import in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    functions = [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    nested = {id(inner) for function in functions for inner in ast.walk(function) if inner is not function}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from jaxrl_llm import x` imports the submodule x when there is one.
            subs = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists()
                     or (PACKAGE.parent / sub.replace(".", "/")).is_dir() else node.module for sub in subs]
        else:
            continue
        for name in names:
            if name == "jaxrl_llm" or name.startswith("jaxrl_llm."):
                yield name, node.lineno, id(node) in nested


def graph() -> dict[str, list[tuple[str, int, bool]]]:
    return {module_name(path): list(imports(path)) for path in sorted(PACKAGE.rglob("*.py"))}


def upward(modules: dict) -> list[str]:
    """Every import of a module from a higher layer."""
    return [
        f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)}) at line {line}"
        for module, edges in modules.items() for target, line, _ in edges
        if target != "jaxrl_llm" and layer(target) > layer(module)
    ]


def test_every_import_points_down():
    wrong = upward(graph())
    assert not wrong, "\n".join(wrong)
    # The check itself is not vacuous: core importing the run loop is caught.
    assert upward({"jaxrl_llm.core.probe": [("jaxrl_llm.run.loop", 1, False)]})


def test_core_imports_nothing_of_ours():
    ours = [(module, target) for module, edges in graph().items() if module.startswith("jaxrl_llm.core")
            for target, _, _ in edges if not target.startswith("jaxrl_llm.core")]
    assert not ours, ours


def test_no_import_cycles():
    edges = {module: {target for target, _, _ in targets if target != module} for module, targets in graph().items()}

    def visit(module, path):
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        for target in edges.get(module, ()):
            visit(target, path + [module])

    for module in edges:
        visit(module, [])


def test_no_late_imports_of_our_modules_in_the_library():
    """An import inside a function hides a dependency (and used to dodge cycles); only the command
    lines defer theirs, so `--help` stays fast."""
    late = [f"{module} line {line}: {target}" for module, edges in graph().items() if module not in COMMAND_LINES
            for target, line, nested in edges if nested]
    assert not late, "\n".join(late)


def test_public_functions_of_core_and_algorithms_have_type_hints():
    """Every argument and the return of each public module-level function, and of public methods."""
    missing = []
    for path in sorted([*PACKAGE.glob("core/*.py"), *PACKAGE.glob("algorithms/*.py")]):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        defs = [(node, "") for node in tree.body if isinstance(node, ast.FunctionDef)]
        defs += [(item, f"{node.name}.") for node in tree.body if isinstance(node, ast.ClassDef)
                 for item in node.body if isinstance(item, ast.FunctionDef)]
        for function, owner in defs:
            if function.name.startswith("_"):
                continue
            args = [a for a in function.args.posonlyargs + function.args.args + function.args.kwonlyargs
                    if a.arg not in ("self", "cls")]
            unhinted = [a.arg for a in args if a.annotation is None]
            if unhinted or function.returns is None:
                returns = " and the return" if function.returns is None else ""
                missing.append(f"{path.relative_to(PACKAGE)}: {owner}{function.name}({', '.join(unhinted)}){returns}")
    assert not missing, "\n".join(missing)
