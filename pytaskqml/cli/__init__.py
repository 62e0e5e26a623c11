"""The command line: `pytaskqml` and `python -m pytaskqml`."""

from .main import main, make_parser

__all__ = ["main", "make_parser"]
