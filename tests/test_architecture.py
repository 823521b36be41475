"""The house rules, read from the source: stage layers, no import cycles, one backbone build."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("components", "tasks", "flows")
# Lowest first: a components package may import itself and the packages before it.
LAYERS = ("common", "engine", "data", "similarity", "training", "decision", "deploy")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every absolute module name ``path`` imports, at any depth (lazy imports count too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def _own(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


GRAPH = {
    m: {d for i in _imports(p) if (d := _own(i)) and d != m and d not in ("components", "tasks")}
    for m, p in MODULES.items()
}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    assert _cycles(GRAPH) == []


def test_components_are_grouped_by_stage_and_documented() -> None:
    flat = [p.name for p in (ROOT / "components").glob("*.py") if p.name != "__init__.py"]
    assert flat == []
    for pkg in ("components", "tasks"):
        subs = sorted(p.name for p in (ROOT / pkg).iterdir() if (p / "__init__.py").is_file())
        assert subs == sorted(
            LAYERS if pkg == "components" else set(LAYERS) - {"deploy"} | {"deploy"}
        )
        for sub in subs:
            doc = ast.get_docstring(ast.parse((ROOT / pkg / sub / "__init__.py").read_text()))
            assert doc and len(doc.splitlines()) <= 3, (
                f"{pkg}/{sub}/__init__.py: two-line docstring"
            )


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("components.")))
def test_components_import_only_their_own_and_lower_layers(module: str) -> None:
    parts = module.split(".")
    if len(parts) < 3:
        return
    mine = LAYERS.index(parts[1])
    for dep in GRAPH[module]:
        assert not dep.startswith(("tasks", "flows")), f"{module} imports {dep}"
        layer = dep.split(".")[1]
        assert LAYERS.index(layer) <= mine, f"{module} ({parts[1]}) imports {dep} ({layer})"
    assert "prefect" not in {i.split(".")[0] for i in _imports(MODULES[module])}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("tasks.")))
def test_tasks_import_components_and_only_their_own_or_the_common_tasks(module: str) -> None:
    own = module.split(".")[1] if module.count(".") >= 2 else None
    for dep in GRAPH[module]:
        assert not dep.startswith("flows"), f"{module} imports {dep}"
        if dep.startswith("tasks."):
            assert dep.split(".")[1] in (own, "common"), f"{module} imports {dep}"


def test_the_backbone_is_built_in_one_place_per_run() -> None:
    """Only the engine opener builds the run's backbone (and the similarity task a stored
    profile's, when that is another network); every other stage is handed the engine."""
    builders = sorted(
        m
        for m, p in MODULES.items()
        if m.startswith(("tasks", "flows"))
        and "components.engine.backbones.load_backbone" in _imports(p)
    )
    assert builders == ["tasks.engine.embed", "tasks.similarity.scores"]
