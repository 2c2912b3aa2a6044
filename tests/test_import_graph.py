"""The import rules of docs/architecture.md, checked on the source: every module under
pipeline/ detector/ ensemble/ segmenter/ flows/ is parsed (imports inside functions count: they
run too), and its imports of the project form a graph with no cycle, in which the packages
import downward only and only flows/ reaches Prefect."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "detector", "ensemble", "segmenter", "flows")
# Who may import whom (docs/architecture.md): each package, the packages below it.
BELOW = {
    "pipeline": set(),
    "detector": {"pipeline"},
    "ensemble": {"pipeline"},
    "segmenter": {"pipeline", "detector", "ensemble"},
    "flows": {"pipeline", "detector", "ensemble", "segmenter"},
    "twopass": {"pipeline", "detector", "ensemble", "segmenter", "flows"},  # the root: the predictor's names
}
# The documented exceptions, each a module (not a package) with its reason:
EXCEPTIONS = {
    # the entry point: its registration list (`PLUGINS`) imports each stage's commands
    "twopass.pipeline.cli": {"detector", "ensemble", "segmenter", "flows"},
    # commands that take a checkpoint of either kind: the one kind map is `segmenter.api.KINDS`
    "twopass.detector.cli": {"segmenter"},
    "twopass.detector.importer": {"segmenter"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[:2] == ("pipeline", "_root"):  # the `twopass` package itself (pyproject.toml maps it)
        return "twopass"
    return ".".join(("twopass", *parts[:-1])) if parts[-1] == "__init__" else ".".join(("twopass", *parts))


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules `name` imports (top-level or inside functions): project modules by name,
    others by their top-level name ("prefect", "torch"). The registration list of the CLI
    (`PLUGINS`, module names as strings) counts as imports."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    known = known | {"twopass"}
    found: set[str] = set()

    def add(target: str) -> None:
        if target.startswith("twopass."):
            while target not in known and "." in target:  # a name inside a module
                target = target.rpartition(".")[0]
            if target in known and target not in (name, "twopass"):  # (every import runs the root's __init__)
                found.add(target)
        elif target != "twopass":
            found.add(target.split(".")[0])

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for a in node.names:
                add(f"{base}.{a.name}")  # a submodule, or a name inside `base` (add() falls back to base)
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "PLUGINS" for t in node.targets):
            for c in ast.walk(node.value):
                if isinstance(c, ast.Constant) and isinstance(c.value, str):
                    add(c.value)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def package_of(module: str) -> str:
    return module.split(".")[1] if "." in module else "twopass"


def test_no_import_cycle(graph):
    project = {m: {t for t in deps if t in graph} for m, deps in graph.items()}
    try:
        tuple(graphlib.TopologicalSorter(project).static_order())
    except graphlib.CycleError as e:
        pytest.fail(f"import cycle: {' -> '.join(e.args[1])}")


def test_packages_import_downward_only(graph):
    wrong = sorted(
        f"{m} imports {t}"
        for m, deps in graph.items()
        for t in deps
        if t in graph and package_of(t) != package_of(m)
        and package_of(t) not in BELOW[package_of(m)] | EXCEPTIONS.get(m, set())
    )
    assert not wrong, "\n".join(wrong)


def reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(t for t in graph.get(m, ()) if t in graph)
    return seen


def test_only_flows_imports_prefect_and_the_plain_executor_reaches_none(graph):
    users = sorted(m for m, deps in graph.items() if "prefect" in deps)
    assert users and all(package_of(m) == "flows" for m in users), users
    # Without Prefect: the DAG description, its plain executor and everything they import.
    for start in ("twopass.flows.steps", "twopass.flows.plain"):
        assert not [m for m in reach(graph, start) if "prefect" in graph[m]], start


def test_the_graph_sees_function_level_and_relative_imports(graph):
    # detector.cli imports the segmenter's kind map inside its `detect` command; flows.plain
    # imports its steps relatively; the CLI's registration list names the stage CLIs.
    assert "twopass.segmenter.api" in graph["twopass.detector.cli"]
    assert "twopass.flows.steps" in graph["twopass.flows.plain"]
    assert {"twopass.detector.cli", "twopass.flows.cli"} <= graph["twopass.pipeline.cli"]
