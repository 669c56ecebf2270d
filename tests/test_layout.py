"""The layout stays flat and readable: no import cycle among the project's modules, no function over 120 lines."""
import ast
import os

from conftest import REPO

MODULES = sorted(name[:-3] for name in os.listdir(REPO) if name.endswith(".py"))


def project_imports(module):
    tree = ast.parse(open(os.path.join(REPO, module + ".py")).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names & set(MODULES)


def test_no_import_cycle():
    graph = {module: project_imports(module) for module in MODULES}
    assert graph["train_rl"] >= {"rollout", "rewards", "ema_grpo", "data"}  # the graph is read, not empty

    def visit(module, path):
        for dep in graph[module]:
            assert dep not in path, f"import cycle: {' -> '.join(path + [dep])}"
            visit(dep, path + [dep])
    for module in MODULES:
        visit(module, [module])
    importers = {module for module in MODULES if graph[module] & {"train_rl", "train_sft"}}
    assert not importers, f"nothing imports a trainer (DESIGN.md): {importers}"


def test_no_function_longer_than_120_lines():
    long = []
    for module in MODULES:
        for node in ast.walk(ast.parse(open(os.path.join(REPO, module + ".py")).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 120:
                long.append(f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, long
