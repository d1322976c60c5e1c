"""The package's shape, read from its source with ast: no import cycle (imports inside functions count, and so does
a submodule's ``from . import X``, an import of its package's ``__init__``), model loading in one direction, and
every third-party package the code imports declared alike in pyproject.toml and requirements.txt."""
import ast
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"


def _modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for path in (SRC / "asl").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _imports(name: str, path: Path, is_package: bool) -> set[str]:
    """Every module this one imports, anywhere in its body, resolved to absolute names."""
    package = name if is_package else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            # `from . import X` imports the package (its __init__) and maybe the submodule X.
            targets.add(module)
            targets.update(f"{module}.{alias.name}" for alias in node.names)
    return targets


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {t for t in _imports(name, *where) if t in modules and t != name} for name, where in modules.items()}


def _cycle(graph: dict[str, set[str]]):
    """One import cycle as a list of modules, or None (depth-first search with colours)."""
    state, trail = {}, []

    def visit(node):
        state[node] = "open"
        trail.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return trail[trail.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        trail.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle():
    graph = _graph()
    assert "asl.checkpoint" in graph and "asl.models.loading" in graph
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_a_cycle_through_a_package_init_is_seen():
    graph = {"asl.models": {"asl.models.loading"}, "asl.models.loading": {"asl.models"}}
    assert _cycle(graph) == ["asl.models", "asl.models.loading", "asl.models"]


def test_model_loading_goes_one_way():
    """Files are found (sources) and read (checkpoint) without the networks; the builders read no file; one module,
    asl.models.loading, ties them."""
    graph = _graph()
    networks = {m for m in graph if m == "asl.models" or m.startswith("asl.models.")}
    for files in ("asl.checkpoint", "asl.sources", "asl.download", "asl.state_dict"):
        assert not graph[files] & networks, (files, graph[files] & networks)
    assert "asl.checkpoint" not in graph["asl.sources"]
    tied = {m for m in networks if graph[m] & {"asl.checkpoint", "asl.sources", "asl.download"}}
    assert tied == {"asl.models.loading"}
    assert "asl.models" not in graph["asl.models.loading"]


# ------------------------------------------------------------------------------------------- dependencies

#: import name -> distribution name, where they differ
_DISTRIBUTION = {"PIL": "pillow", "yaml": "pyyaml"}


def _requirement_name(line: str) -> str:
    return re.split(r"[<>=!~;\[ ]", line.strip(), maxsplit=1)[0].lower().replace("-", "_")


def test_every_third_party_import_is_declared_and_requirements_agree():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [_requirement_name(d) for d in project["dependencies"]]
    extras = {_requirement_name(d) for group in project["optional-dependencies"].values() for d in group}
    lines = [x for x in (REPO / "requirements.txt").read_text().splitlines() if x.strip() and not x.startswith("#")]
    assert sorted(map(str.strip, lines)) == sorted(d.strip() for d in project["dependencies"])

    imported = set()
    for path, _ in _modules().values():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m != "asl"}
    wanted = {_DISTRIBUTION.get(m, m).lower() for m in third_party}
    assert wanted - set(declared) - extras == set()
    assert {"huggingface_hub", "safetensors", "pyyaml"} <= set(declared)
