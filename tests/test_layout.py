"""The package's shape, enforced from the source: every module sits in the layer its folder
names, imports only from the layers below it (the table below, also in docs/layout.md), and no
two modules import each other, directly or round a loop. Every import counts: at module level,
inside a function, and those only for type checking (a lower layer that needs a higher one's
type declares a ``typing.Protocol`` of its own). Modules are split by responsibility, never by
size, so no line count is enforced."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pytaskqml"

# layer -> the layers its modules may import (besides their own). A top-level module other
# than errors is the front; __init__ is the front door (it loads features lazily).
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "wire": {"errors"},
    "core": {"errors"},
    "buffers": {"errors", "wire", "core"},
    "worker": {"errors", "wire", "core", "buffers"},
    "engine": {"errors", "wire", "core", "buffers", "worker"},
    "ingress": {"errors", "wire", "core"},
    "observe": {"errors", "wire", "core", "ingress"},
    "front": {"errors", "wire", "core", "buffers", "worker", "engine", "ingress", "observe"},
    "pipeline": {"errors", "wire", "core", "worker", "engine", "front"},
    "redis": {"errors", "wire", "core", "engine", "front"},
    "service": {"errors", "wire", "ingress", "observe", "pipeline", "front"},
    "cli": {
        "errors", "wire", "core", "buffers", "worker", "engine", "ingress", "observe", "front",
        "pipeline", "redis", "service", "__init__",
    },
    "__init__": {
        "errors", "wire", "core", "buffers", "worker", "engine", "ingress", "observe", "front",
        "pipeline", "redis", "service",
    },
    "__main__": {"cli"},
}  # fmt: skip


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    if len(parts) == 2 and f"pytaskqml.{parts[1]}" in MODULES and not (PACKAGE / parts[1]).is_dir():
        return parts[1] if parts[1] in ("errors", "__main__") else "front"
    return parts[1]


def imports(module: str) -> set[str]:
    """Every module of the package `module` imports, wherever the import statement is."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("pytaskqml"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            elif node.module and node.module.startswith("pytaskqml"):
                target = node.module
            else:
                continue
            for alias in node.names:
                # `from . import x` names a module when x is one
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
    return {m for m in found if m in MODULES and m != module}


GRAPH = {m: imports(m) for m in MODULES}


def test_the_docs_layout_table_names_every_layer() -> None:
    table = (ROOT / "docs" / "layout.md").read_text()
    listed = set(re.findall(r"^\| `pytaskqml/(\w+)/?", table, re.M))
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert folders <= listed
    for name in ALLOWED:
        if name not in ("front", "__init__", "__main__", "errors"):
            assert (PACKAGE / name / "__init__.py").exists(), name
            doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text()))
            assert doc and "import" in doc, f"pytaskqml/{name}/__init__.py: say what it may import"


def test_every_module_is_in_a_known_layer() -> None:
    assert {layer(m) for m in MODULES} <= set(ALLOWED)


def test_imports_point_down() -> None:
    wrong = [
        f"{m} ({layer(m)}) imports {n} ({layer(n)})"
        for m, targets in GRAPH.items()
        for n in sorted(targets)
        if layer(n) != layer(m) and layer(n) not in ALLOWED[layer(m)]
    ]
    assert not wrong, "\n".join(wrong)


def test_the_layer_table_has_no_cycle() -> None:
    order: list[str] = []

    def visit(name: str, seen: tuple[str, ...]) -> None:
        assert name not in seen, " -> ".join([*seen, name])
        for below in sorted(ALLOWED[name]):
            visit(below, (*seen, name))
        order.append(name)

    for name in ALLOWED:
        visit(name, ())


def test_modules_import_each_other_without_a_cycle() -> None:
    state: dict[str, int] = {}  # 1 visiting, 2 done
    cycles: list[str] = []

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycles.append(
                    " -> ".join([*path[path.index(nxt) :], node, nxt])
                    if nxt in path
                    else f"{node} -> {nxt}"
                )
            elif nxt not in state:
                walk(nxt, [*path, node])
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            walk(name, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_only_the_front_lives_at_the_top_of_the_package() -> None:
    # a module's layer is its folder: nothing else is at the top but the front
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert top == {
        "__init__", "__main__", "errors", "coordinator", "coordctl", "executor",
        "client", "examples",
    }  # fmt: skip


def test_only_the_engine_reaches_its_scheduler() -> None:
    # The engine's scheduler is called under the engine's lock; everything else goes through
    # the engine's own methods (new_ids, new_source, worker_count, handles, ...). So outside
    # engine/engine.py no `engine.core` / `self._engine.core` attribute is read.
    engines = {"engine", "_engine"}
    found = []
    for module, path in MODULES.items():
        if module == "pytaskqml.engine.engine":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Attribute) and node.attr == "core"):
                continue
            owner = node.value
            name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", None)
            if name in engines:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, "reaches into the engine's scheduler: " + ", ".join(found)


# ---------------------------------------------------------------- one class, one concern


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _ours(cls: type) -> bool:
    return cls.__module__.split(".")[0] == "pytaskqml"


def _stdlib(cls: type) -> bool:
    return cls.__module__.split(".")[0] in sys.stdlib_module_names


def _self_attributes(cls: type, *, stored: bool) -> set[str]:
    """The names its methods read from ``self`` (or, with *stored*, set on it)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    names: set[str] = set()
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) or not fn.args.args:
            continue
        me = fn.args.args[0].arg
        for node in ast.walk(fn):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == me
                and isinstance(node.ctx, ast.Store) == stored
            ):
                names.add(node.attr)
    return names


def relies_on_its_subclass(base: type) -> set[str]:
    """What *base*'s methods read from ``self`` that neither it nor its own bases provide (a
    bare annotation does not provide it): the state a mixin expects its host to set up."""
    provided: set[str] = set()
    for cls in base.__mro__:
        provided |= set(vars(cls))
        if _stdlib(cls):
            provided |= set(dir(cls))
        else:
            provided |= _self_attributes(cls, stored=True)
    return _self_attributes(base, stored=False) - provided


def is_exempt(base: type) -> bool:
    """Exceptions, Protocols and classes deriving from the standard library's."""
    return (
        issubclass(base, BaseException)
        or bool(getattr(base, "_is_protocol", False))
        or any(_stdlib(c) for c in base.__mro__[1:-1])
    )


def mixins(classes: list[type], ours: Callable[[type], bool] = _ours) -> set[tuple[str, str]]:
    """(class, base) for each base of ours from another module that is a mixin of the class."""
    found = set()
    for cls in classes:
        for base in cls.__mro__[1:]:
            if (
                ours(base)
                and base.__module__ != cls.__module__
                and not is_exempt(base)
                and relies_on_its_subclass(base)
            ):
                found.add((_qualname(cls), _qualname(base)))
    return found


def _package_classes() -> list[type]:
    classes = []
    for name in MODULES:
        if name.endswith("__main__"):
            continue
        module = importlib.import_module(name)
        classes += [
            c for c in vars(module).values() if isinstance(c, type) and c.__module__ == name
        ]
    return classes


class _SampleMixin:
    """A mixin: it uses state that its host class sets up."""

    limit: int

    def over(self, n: int) -> bool:
        return n > self.limit


class _SampleHost(_SampleMixin):
    __module__ = "elsewhere"

    def __init__(self) -> None:
        self.limit = 3


class _SampleBase:
    """A base class with its own state: not a mixin."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def over(self, n: int) -> bool:
        return n > self.limit


class _SampleChild(_SampleBase):
    __module__ = "elsewhere"


def test_the_mixin_check_finds_a_mixin_and_only_that() -> None:
    assert relies_on_its_subclass(_SampleMixin) == {"limit"}
    assert relies_on_its_subclass(_SampleBase) == set()
    found = mixins([_SampleHost, _SampleChild], ours=lambda c: c.__module__ == __name__)
    assert found == {("elsewhere._SampleHost", f"{__name__}._SampleMixin")}


def test_the_coordinator_holds_its_parts() -> None:
    from pytaskqml import Coordinator

    assert Coordinator.__mro__ == (Coordinator, object)


def test_no_class_is_a_mixin_of_a_class_in_another_module() -> None:
    found = mixins(_package_classes())
    assert found == set(), "mixins: fold them back or hold them as parts"
