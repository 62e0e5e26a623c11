"""The documentation is tested: every Python block in README.md and docs/ runs as written
(each as a script of its own), the API reference covers every public name, and every public
name and command line option says what it does.

A block that cannot run as it stands (it needs another machine, a key file, a module of
yours) is marked on the line before its fence with ``<!-- not run: REASON -->``, and the
reason is required. A block using ``RedisQueue`` is skipped, with the reason, where no Redis
answers. A page may include another file with a snippet line (``--8<-- "SECURITY.md"``): its
blocks are checked as part of the page.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, child_env

from pytaskqml.cli.main import make_parser

DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.parts)]
_FENCE = re.compile(
    r"^(?:<!-- not run: (?P<why>.*?) -->\n)?```python\n(?P<code>.*?)^```", re.S | re.M
)
_SNIPPET = re.compile(r'^--8<-- "(?P<path>[^"]+)"$', re.M)


def _text(page: Path) -> str:
    return _SNIPPET.sub(lambda m: (ROOT / m.group("path")).read_text(), page.read_text())


def _blocks() -> list[tuple[str, int, str, str | None]]:
    found = []
    for page in PAGES:
        for n, m in enumerate(_FENCE.finditer(_text(page))):
            found.append((str(page.relative_to(ROOT)), n, m.group("code"), m.group("why")))
    return found


BLOCKS = _blocks()
RUNNABLE = [b for b in BLOCKS if b[3] is None]


def test_the_docs_have_runnable_python_blocks() -> None:
    assert sum(1 for b in RUNNABLE if b[0] == "README.md") >= 1
    assert len(RUNNABLE) >= 20


def test_every_block_marked_not_runnable_says_why() -> None:
    unexplained = [
        f"{page} block {n}"
        for page, n, _, why in BLOCKS
        if why is not None and len(why.strip()) < 10
    ]
    assert not unexplained


def test_no_python_block_hides_from_the_tests() -> None:
    """A ```py, ```python3 or ~~~python fence, an indented one (in a list) or one with
    attributes would not be run: every Python block is a bare ```python at the margin."""
    fence = re.compile(r"^[ \t]*(?:```|~~~)[ \t]*\{?[ \t]*\.?(?:py|python3?|pycon)\b.*$", re.M)
    for page in PAGES:
        hidden = [m.group(0) for m in fence.finditer(_text(page)) if m.group(0) != "```python"]
        assert not hidden, (page, hidden)


@pytest.mark.parametrize(
    ("page", "index", "code"),
    [(p, n, c) for p, n, c, _ in RUNNABLE],
    ids=[f"{p}-{n}" for p, n, _, _ in RUNNABLE],
)
def test_a_docs_block_runs(page: str, index: int, code: str, tmp_path: Path) -> None:
    if "RedisQueue" in code:
        from redisfixtures import redis_missing

        why = redis_missing()
        if why is not None:
            pytest.skip(f"this block needs a Redis: {why}")
    script = tmp_path / f"block{index}.py"
    script.write_text(code)
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=str(tmp_path),
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"{page} block {index} failed:\n{code}\n{done.stderr}"


# Where the public names live: the front door and the modules that hold the rest.
PUBLIC_MODULES = [
    "pytaskqml",
    "pytaskqml.errors",
    "pytaskqml.client",
    "pytaskqml.core",
    "pytaskqml.engine",
    "pytaskqml.worker",
    "pytaskqml.ingress",
    "pytaskqml.pipeline",
    "pytaskqml.redis",
    "pytaskqml.wire",
]


def _public() -> dict[str, object]:
    found: dict[str, object] = {}
    for module in map(importlib.import_module, PUBLIC_MODULES):
        for name in module.__all__:
            if name != "__version__":
                found[name] = getattr(module, name)
    return found


def test_the_api_reference_covers_every_public_name() -> None:
    documented: dict[str, str] = {}
    for page in (DOCS / "api").glob("*.md"):
        text = page.read_text()
        for path, name in re.findall(r"^::: (pytaskqml(?:\.\w+)*)\.(\w+)$", text, re.M):
            assert path in PUBLIC_MODULES, f"{page.name}: {path}.{name} is not a public module"
            assert name in importlib.import_module(path).__all__, f"{path}.{name}"
            documented[name] = path
    public = _public()
    assert set(public) - set(documented) == set()
    assert set(documented) - set(public) == set()


def _public_members(obj: type) -> list[tuple[str, object]]:
    members = []
    for klass in obj.__mro__:
        if klass is object or not klass.__module__.startswith("pytaskqml"):
            continue
        for name, value in vars(klass).items():
            if not name.startswith("_") and (callable(value) or isinstance(value, property)):
                members.append((f"{obj.__name__}.{name}", value))
    return members


def test_every_public_name_and_method_has_a_docstring() -> None:
    missing = []
    for name, obj in _public().items():
        if not inspect.getdoc(obj):
            missing.append(name)
        if inspect.isclass(obj) and not issubclass(obj, BaseException):
            for qualname, member in _public_members(obj):
                target = member.fget if isinstance(member, property) else member
                target = getattr(target, "__func__", target)
                if not (getattr(target, "__doc__", None) or "").strip():
                    missing.append(qualname)
    assert not missing, f"no docstring: {sorted(set(missing))}"


def _commands(
    parser: argparse.ArgumentParser, prefix: str = "pytaskqml"
) -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(prefix, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _commands(sub, f"{prefix} {name}")
    return found


def test_every_command_and_option_has_help() -> None:
    missing = []
    for command, parser in _commands(make_parser()):
        if not parser.description:
            missing.append(f"{command}: no description")
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{command} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, "without --help text:\n" + "\n".join(missing)


def test_the_cli_page_shows_every_command() -> None:
    page = (DOCS / "cli.md").read_text()
    shown = set(re.findall(r"<!-- cli-help:([a-z ]*)-->", page))
    expected = {c.removeprefix("pytaskqml").strip() + " " for c, _ in _commands(make_parser())}
    assert {s.strip() for s in shown} == {e.strip() for e in expected}
