"""The layers hold: imports point down only, and no module but compat reaches into a library.

Read from the source (AST), not by importing, so a violation is named by file and line. A new
module must be placed in LAYERS (a new objective, model or dataset is inside its package and
needs nothing here).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "searchkd"

# Lower ranks never import higher ones. Packages (data, models, objectives) count as one module.
LAYERS = {
    "__version__": -1,
    "registry": -1,
    "metrics": -1,
    "spec": 0,
    "storage": 0,
    "mlflow_ui": 0,
    "record": 1,
    "compat": 0,
    "data": 1,
    "models": 1,
    "objectives": 2,
    "engine": 3,
    "teacher": 4,
    "trial": 4,
    "tracking": 4,
    "scheduler": 4,
    "samplers": 4,
    "preflight": 5,
    "driver": 5,
    "search": 6,
    "analysis": 5,
    "plots": 6,
    "report": 7,
    "export": 6,
    "final": 6,
    "api": 8,
    "cli": 9,
    "__init__": 10,  # the package's facade: `searchkd.tune` etc., imported from api on first use
}
# Up to the engine, plain PyTorch: benchmarks and GPU profiling drive it without Ray.
PLAIN = {
    "spec",
    "storage",
    "registry",
    "metrics",
    "record",
    "data",
    "models",
    "objectives",
    "engine",
    "teacher",
}
FRAMEWORKS = ("ray", "optuna", "mlflow")
# namedtuple's public API, spelt with an underscore so as not to clash with field names.
NAMEDTUPLE = {"_replace", "_asdict", "_fields", "_make", "_field_defaults"}


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py"))


def unit(path: Path) -> str:
    """`searchkd/objectives/msd.py` -> 'objectives'; `searchkd/engine.py` -> 'engine'."""
    rel = path.relative_to(PACKAGE).parts
    return rel[0] if len(rel) > 1 else path.stem


def imports(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, absolute dotted name) for each import in the file."""
    tree = ast.parse(path.read_text())
    package = ["searchkd", *path.relative_to(root).parts[:-1]]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                names = [node.module] if node.module else [a.name for a in node.names]
                out += [(node.lineno, f"{base}.{n}") for n in names]
            else:
                out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def test_every_module_has_a_layer() -> None:
    assert {unit(p) for p in modules()} <= set(LAYERS)


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path: Path) -> None:
    here = unit(path)
    for line, name in imports(path):
        parts = name.split(".")
        if parts[0] == "searchkd" and len(parts) > 1 and parts[1] != here:
            there = parts[1]
            assert LAYERS[there] < LAYERS[here], f"{path.name}:{line} {here} imports {there}"
        if here in PLAIN:
            assert parts[0] not in FRAMEWORKS, f"{path.name}:{line} imports {name}"


def private_uses(path: Path, root: Path = PACKAGE) -> list[str]:
    """`x._name` on anything but self/cls, `_private` library modules, and, in a class built
    on a library's class, `self._name` the class does not assign itself (the base's private)."""
    tree = ast.parse(path.read_text())
    found = []
    for line, name in imports(path, root):
        if not name.startswith("searchkd") and any(
            p.startswith("_") and not p.startswith("__") for p in name.split(".")
        ):
            found.append(f"{path.name}:{line} import {name}")
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and node.attr not in NAMEDTUPLE
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
        ):
            found.append(f"{path.name}:{node.lineno} ._{node.attr[1:]}")
        if isinstance(node, ast.ClassDef) and node.bases:
            own = {
                t.attr
                for n in ast.walk(node)
                if isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign))
                for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
                if isinstance(t, ast.Attribute)
                and isinstance(t.value, ast.Name)
                and t.value.id == "self"
            }
            own |= {
                n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            }
            for n in ast.walk(node):
                if (
                    isinstance(n, ast.Attribute)
                    and isinstance(n.value, ast.Name)
                    and n.value.id == "self"
                    and n.attr.startswith("_")
                    and not n.attr.startswith("__")
                    and n.attr not in own
                ):
                    found.append(f"{path.name}:{n.lineno} self.{n.attr} (a base class's private)")
    return found


@pytest.mark.parametrize(
    "path", [p for p in modules() if p.stem != "compat"], ids=lambda p: str(p.relative_to(PACKAGE))
)
def test_no_private_names_outside_compat(path: Path) -> None:
    assert private_uses(path) == []


def test_the_private_check_catches_what_it_should(tmp_path: Path) -> None:
    probe = tmp_path / "search.py"
    probe.write_text(
        "import ray._private.services\n"
        "from optuna.trial import _frozen\n"
        "class S(Searcher):\n"
        "    def f(self):\n"
        "        self._own = 1\n"
        "        return self._metric, self._own, trial._trial_id, p._replace(a=1)\n"
    )
    found = private_uses(probe, root=tmp_path)
    assert sorted(f.split(" ", 1)[1] for f in found) == sorted(
        [
            "import ray._private.services",
            "import optuna.trial._frozen",
            "._trial_id",
            "self._metric (a base class's private)",
        ]
    )


def searchkd_privates_used(path: Path) -> list[str]:
    """Private names of searchkd that a test or benchmark imports or reads off a module."""
    tree = ast.parse(path.read_text())
    modules: set[str] = set()  # local names bound to searchkd modules
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("searchkd"):
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    found.append(f"{path.name}:{node.lineno} imports {a.name}")
                modules.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            modules |= {a.asname or a.name for a in node.names if a.name.startswith("searchkd")}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            found.append(f"{path.name}:{node.lineno} {node.value.id}.{node.attr}")
    return found


@pytest.mark.parametrize(
    "path",
    sorted(
        [
            *PACKAGE.parent.joinpath("tests").glob("*.py"),
            *PACKAGE.parent.joinpath("bench").glob("*.py"),
        ]
    ),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_tests_and_benchmarks_use_no_private_name_of_searchkd(path: Path) -> None:
    assert searchkd_privates_used(path) == []
