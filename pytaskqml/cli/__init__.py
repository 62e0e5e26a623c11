"""The command line: the ``pytaskqml`` command and ``python -m pytaskqml`` (``main``).

One module per command (``worker``, ``run``, ``serve``, ``queue``, ``status``, ``models``,
``token``) and what they share (``common``).

May import: every layer, and the package's front door.
"""

from .main import main, make_parser

__all__ = ["main", "make_parser"]
