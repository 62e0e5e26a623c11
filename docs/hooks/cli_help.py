"""MkDocs hook: ``<!-- cli-help: queue serve -->`` in a page becomes the ``--help`` of that
command, taken from the parser itself, so the CLI page cannot drift from the program."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
from typing import Any

_MARKER = re.compile(r"<!-- cli-help:([a-z ]*)-->")


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and name in action.choices:
            found: argparse.ArgumentParser = action.choices[name]
            return found
    raise KeyError(f"pytaskqml has no command {name!r}")


def help_text(command: str) -> str:
    """The ``--help`` output of ``pytaskqml COMMAND`` (words separated by spaces), 88 wide."""
    from pytaskqml.cli.main import make_parser

    os.environ["COLUMNS"] = "88"  # argparse wraps to the terminal's width
    parser = make_parser()
    for word in command.split():
        parser = _subparser(parser, word)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        parser.print_help()
    return out.getvalue().rstrip()


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    def replace(match: re.Match[str]) -> str:
        return f"```text\n{help_text(match.group(1).strip())}\n```"

    return _MARKER.sub(replace, markdown)
