"""Griffe extension for the API reference: the docstrings use Sphinx roles
(:class:`Coordinator`, :meth:`~pytaskqml.Coordinator.map`), which Markdown would show
verbatim; they become code spans here, named as a reader would type them."""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|meth|func|attr|mod|data|exc|obj):`(~?)([^`]+)`")


def _code(match: re.Match[str]) -> str:
    short, name = match.group(1), match.group(2)
    if short:
        name = name.rsplit(".", 1)[-1]
    return f"`{name}`"


class RstRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(_code, obj.docstring.value)
