"""The import rule of docs/ARCHITECTURE.md, checked on the source code.

Every ``import`` of every module under ``src/segany`` is read with :mod:`ast` (at the top
of a file, inside functions and under ``TYPE_CHECKING`` alike; relative imports resolved)
and checked against the layers of the architecture page:

1. nothing under ``segany/modeling/`` imports anything from segany outside it;
2. imports point down the layers (model < core < data < tools < entry points);
3. there are no import cycles between modules (a listed forward of a moved name, made
   only inside a module-level ``__getattr__``, is not a dependency: see :data:`FORWARDS`).

Each checker is also run on synthetic sources and graphs, so that a broken checker
cannot pass silently. Nothing here imports segany: the files are parsed, not run.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "segany"
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"

# Layers, bottom first, with the module prefixes that belong to them. Modules under no
# prefix here (the top-level modules of src/segany, and any new top-level package) are
# the core. Layers of equal rank may not import each other.
CORE = "core"
LAYERS: dict[str, tuple[int, tuple[str, ...]]] = {
    "errors": (-1, ("segany.errors",)),  # the error type every layer above the model raises
    "modeling": (0, ("segany.modeling",)),
    "inference": (1, ("segany.inference",)),
    CORE: (2, ()),
    "data": (3, ("segany.data",)),
    "evaluate": (4, ("segany.evaluate",)),
    "train": (4, ("segany.train",)),
    "engine": (5, ("segany.engine",)),
    "serve": (6, ("segany.serve",)),
    "entry points": (7, ("segany.commands", "segany.cli", "segany.demo")),
}

# Old import paths of moved names: a module-level ``__getattr__`` (PEP 562) that finds
# them in their new home when first asked for. Importing the module does not run it, so
# such an import is left out of the cycle check; it still counts for the layers. Only the
# forwards listed here are allowed, and only while nothing else imports the same target.
FORWARDS: dict[str, set[str]] = {
    "segany.build": {"segany.loading"},  # load_model & co. moved to loading.py (#21)
}

# ------------------------------------------------------------------------------ checker


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer_of(module: str) -> str:
    """The layer a ``segany`` module belongs to."""
    for name, (_, prefixes) in LAYERS.items():
        if any(_within(module, prefix) for prefix in prefixes):
            return name
    return CORE


def source_modules(src: Path = SRC) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package under ``src``."""
    modules = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported_modules(source: str, module: str, is_package: bool, known: Iterable[str]) -> set[str]:
    """The ``segany`` modules that ``source`` (the text of ``module``) imports, anywhere.

    ``from X import name`` counts as importing ``X.name`` when that is a module in
    ``known``, else as importing ``X`` (a package's ``__init__``).
    """
    return _imports_under(ast.parse(source), module, is_package, known)


def forwarded_modules(source: str, module: str, is_package: bool, known: Iterable[str]) -> set[str]:
    """The ``segany`` modules that ``source`` imports only inside its module-level
    ``__getattr__`` (forwards of moved names), and nowhere else."""
    tree = ast.parse(source)
    forwards = [
        node
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == "__getattr__"
    ]
    inside: set[str] = set()
    for node in forwards:
        inside |= _imports_under(node, module, is_package, known)
    rest = ast.Module(body=[n for n in tree.body if n not in forwards], type_ignores=[])
    return inside - _imports_under(rest, module, is_package, known)


def _imports_under(root: ast.AST, module: str, is_package: bool, known: Iterable[str]) -> set[str]:
    known = set(known)
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(root):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                if node.level - 1 >= len(parts):
                    raise ValueError(f"{module}: relative import beyond the top package")
                base = parts[: len(parts) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                found.add(submodule if submodule in known else target)
    return {name for name in found if _within(name, PACKAGE) and name != module}


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Module -> the segany modules it imports, for the whole package."""
    modules = source_modules(src)
    return {
        name: imported_modules(
            path.read_text(encoding="utf-8"), name, path.name == "__init__.py", modules
        )
        for name, path in modules.items()
    }


def forward_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Module -> the segany modules it imports only to forward moved names (see
    :data:`FORWARDS`), for the modules that have such imports."""
    graph = {}
    modules = source_modules(src)
    for name, path in modules.items():
        text = path.read_text(encoding="utf-8")
        forwarded = forwarded_modules(text, name, path.name == "__init__.py", modules)
        if forwarded:
            graph[name] = forwarded
    return graph


def without_forwards(
    graph: Mapping[str, Iterable[str]], forwards: Mapping[str, Iterable[str]]
) -> dict[str, set[str]]:
    """``graph`` less the forwarding imports in ``forwards``."""
    return {
        module: set(targets) - set(forwards.get(module, ())) for module, targets in graph.items()
    }


def modeling_violations(graph: Mapping[str, Iterable[str]]) -> list[str]:
    """Imports from ``segany.modeling`` of anything in segany outside it."""
    return sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        if _within(module, "segany.modeling")
        for target in targets
        if not _within(target, "segany.modeling")
    )


def upward_imports(graph: Mapping[str, Iterable[str]]) -> list[str]:
    """Imports that point up the layers, or sideways between layers of one rank."""
    found = []
    for module, targets in graph.items():
        source_layer = layer_of(module)
        for target in targets:
            target_layer = layer_of(target)
            if target_layer == source_layer:
                continue
            if LAYERS[target_layer][0] >= LAYERS[source_layer][0]:
                found.append(f"{module} ({source_layer}) imports {target} ({target_layer})")
    return sorted(found)


def import_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """One import cycle (``[a, b, ..., a]``), or None when the graph has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def top_level_names(src: Path = SRC) -> list[str]:
    """``name.py`` for each top-level module and ``name/`` for each subpackage."""
    root = src / PACKAGE
    names = [path.name for path in root.glob("*.py")]
    names += [f"{path.name}/" for path in root.iterdir() if (path / "__init__.py").is_file()]
    return sorted(names)


# ------------------------------------------------------------------ the rules, on segany


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_checker_sees_the_package(graph) -> None:
    # Guards against a checker that passes because it found nothing.
    assert {"segany", "segany.modeling", "segany.modeling.sam", "segany.predictor"} <= set(graph)
    assert "segany.modeling.mask_decoder" in graph["segany.modeling.sam"]
    assert "segany.modeling" in graph["segany.predictor"]
    assert "segany.commands.segment" in graph["segany.cli"]  # an import inside a function


def test_modeling_imports_nothing_outside_modeling(graph) -> None:
    assert modeling_violations(graph) == []


def test_imports_point_down_the_layers(graph) -> None:
    assert upward_imports(graph) == [], (
        "an import points up the layers of docs/ARCHITECTURE.md; move the code to the "
        "right layer (or, if the architecture changed, update the page and LAYERS here)"
    )


def test_no_import_cycles(graph) -> None:
    forwards = forward_graph()
    assert forwards == FORWARDS, (
        "a module-level __getattr__ imports segany modules that are not in FORWARDS (or a "
        "listed forward is gone): list it there and on docs/ARCHITECTURE.md, or remove it"
    )
    assert import_cycle(without_forwards(graph, forwards)) is None


def test_every_top_level_module_is_on_the_architecture_page() -> None:
    text = ARCHITECTURE.read_text(encoding="utf-8")
    missing = [name for name in top_level_names() if f"`{name}`" not in text]
    assert missing == [], f"place these in a layer of docs/ARCHITECTURE.md: {missing}"


# --------------------------------------------------------------- the checker, on fakes

KNOWN = {
    "segany",
    "segany.errors",
    "segany.weights",
    "segany.predictor",
    "segany.modeling",
    "segany.modeling.sam",
    "segany.modeling.common",
    "segany.data",
    "segany.data.coco",
    "segany.serve",
    "segany.serve.app",
    "segany.engine",
    "segany.engine.auto",
}


def _imports(source: str, module: str, is_package: bool = False) -> set[str]:
    return imported_modules(source, module, is_package, KNOWN)


def test_relative_and_absolute_imports_are_resolved() -> None:
    source = (
        "from .common import MLPBlock\n"
        "from ..errors import SeganyError\n"
        "from segany import weights, __version__\n"
        "import segany.engine.auto as auto\n"
        "import numpy as np\n"
        "from torch import nn\n"
    )
    assert _imports(source, "segany.modeling.sam") == {
        "segany.modeling.common",
        "segany.errors",
        "segany.weights",
        "segany",
        "segany.engine.auto",
    }
    # In a package's __init__, "." is the package itself.
    assert _imports("from .sam import Sam\nfrom . import common", "segany.modeling", True) == {
        "segany.modeling.sam",
        "segany.modeling.common",
    }
    with pytest.raises(ValueError, match="beyond the top package"):
        _imports("from ... import x", "segany.errors")


def test_lazy_and_type_checking_imports_count() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from segany.predictor import SamPredictor\n"
        "def f():\n"
        "    from ..serve import app\n"
        "class C:\n"
        "    def g(self):\n"
        "        import segany.engine\n"
    )
    assert _imports(source, "segany.data.coco") == {
        "segany.predictor",
        "segany.serve.app",
        "segany.engine",
    }


def test_a_modeling_import_from_above_is_caught() -> None:
    graph = {
        "segany.modeling.sam": _imports(
            "from .common import X\ndef f():\n    from ..predictor import SamPredictor",
            "segany.modeling.sam",
        ),
        "segany.modeling": _imports("from segany import __version__", "segany.modeling", True),
    }
    assert modeling_violations(graph) == [
        "segany.modeling imports segany",
        "segany.modeling.sam imports segany.predictor",
    ]
    assert modeling_violations({"segany.modeling.sam": {"segany.modeling.common"}}) == []


@pytest.mark.parametrize(
    ("module", "target"),
    [
        ("segany.modeling.sam", "segany.inference.model"),  # model -> inference
        ("segany.modeling.sam", "segany.predictor"),  # model -> core
        ("segany.modeling.sam", "segany.serve.app"),
        ("segany.predictor", "segany.commands.segment"),  # core -> entry points
        ("segany.predictor", "segany.serve.app"),  # core -> tools
        ("segany.automatic_mask_generator", "segany.engine.auto"),
        ("segany.build", "segany.train.trainer"),
        ("segany.masks", "segany.evaluate"),
        ("segany.images", "segany.data.base"),  # core -> data
        ("segany.inference.model", "segany.predictor"),  # inference -> core
        ("segany.inference.model", "segany.data"),
        ("segany.hooks", "segany.data"),  # a new top-level package is core
        ("segany.errors", "segany.modeling"),
        ("segany.data.coco", "segany.serve.importer"),  # data -> tools
        ("segany.data.coco", "segany.engine.propose"),
        ("segany.data.base", "segany.train.config"),
        ("segany.data.base", "segany.evaluate"),
        ("segany.data.base", "segany.cli"),
        ("segany.train.trainer", "segany.evaluate"),  # sideways: same rank
        ("segany.evaluate", "segany.train"),
        ("segany.train.trainer", "segany.engine.retrain"),  # tools, upwards
        ("segany.engine.propose", "segany.serve.store"),
        ("segany.serve.app", "segany.commands.common"),  # tools -> entry points
        ("segany.engine.auto", "segany.demo"),
    ],
)
def test_an_upward_import_is_caught(module: str, target: str) -> None:
    assert len(upward_imports({module: {target}})) == 1


@pytest.mark.parametrize(
    ("module", "target"),
    [
        ("segany.predictor", "segany.modeling.sam"),
        ("segany.predictor", "segany.precision"),
        ("segany.predictor", "segany.inference.model"),
        ("segany.inference.model", "segany.modeling.sam"),
        ("segany.inference.precision", "segany.errors"),
        ("segany.predictor", "segany.errors"),
        ("segany.data.base", "segany.images"),
        ("segany.evaluate", "segany.data"),
        ("segany.train.trainer", "segany.modeling"),
        ("segany.engine.retrain", "segany.train"),
        ("segany.engine.retrain", "segany.evaluate"),
        ("segany.serve.importer", "segany.engine.propose"),
        ("segany.commands.serve", "segany.serve"),
        ("segany.demo", "segany.cli"),
        ("segany.cli", "segany.commands.segment"),
    ],
)
def test_a_downward_import_is_allowed(module: str, target: str) -> None:
    assert upward_imports({module: {target}}) == []


def test_an_import_cycle_is_caught() -> None:
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert import_cycle({"x": {"y"}, "y": {"y2"}, "y2": {"y"}}) == ["y", "y2", "y"]


def test_a_forward_is_only_an_import_inside_module_getattr() -> None:
    forward = (
        "from typing import Any\n"
        "from .common import X\n"
        "def __getattr__(name: str) -> Any:\n"
        "    from ..serve import app\n"
        "    return getattr(app, name)\n"
    )
    assert forwarded_modules(forward, "segany.engine.auto", False, KNOWN) == {"segany.serve.app"}
    # The same import elsewhere (here in another function) is a dependency, not a forward.
    used = forward + "def f():\n    from ..serve import app\n"
    assert forwarded_modules(used, "segany.engine.auto", False, KNOWN) == set()
    nested = "class C:\n    def __getattr__(self, name):\n        from ..serve import app\n"
    assert forwarded_modules(nested, "segany.engine.auto", False, KNOWN) == set()
    # Left out of the cycle check only.
    graph = {"a": {"b"}, "b": {"a"}}
    assert import_cycle(without_forwards(graph, {"a": {"b"}})) is None
    assert import_cycle(without_forwards(graph, {})) == ["a", "b", "a"]


def test_an_undocumented_module_is_caught(tmp_path) -> None:
    package = tmp_path / PACKAGE
    (package / "inference").mkdir(parents=True)
    (package / "inference" / "__init__.py").write_text("")
    (package / "predictor.py").write_text("")
    (package / "static").mkdir()  # not a package: not a module either
    assert top_level_names(tmp_path) == ["inference/", "predictor.py"]
    page = "`predictor.py` and `modeling/`"
    assert [name for name in top_level_names(tmp_path) if f"`{name}`" not in page] == ["inference/"]


def test_layers_match_the_page() -> None:
    # The ranks here are the order the page draws; a layer renamed on one side fails.
    text = ARCHITECTURE.read_text(encoding="utf-8")
    for prefixes in (prefixes for _, prefixes in LAYERS.values()):
        for prefix in prefixes:
            name = prefix.removeprefix("segany.")
            assert re.search(rf"`{re.escape(name)}(/|\.py)`", text), name
