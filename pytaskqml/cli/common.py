"""What the ``pytaskqml`` commands share: exit codes, the one-line error, keys, addresses,
logging."""

from __future__ import annotations

import argparse
import logging

from ..wire import connection as _connection
from ..wire.auth import resolve_authkey
from ..worker.bootstrap import setup_logging

EXIT_USAGE = 2
EXIT_FAILURE = 1


class UserError(Exception):
    """Ends a command with one line on stderr (``pytaskqml: error: ...``) and *code*."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def add_key_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--authkey-file",
        metavar="PATH",
        help="file holding the shared key (else $PYTASKQML_AUTHKEY)",
    )


def read_key(path: str | None) -> bytes | None:
    if path:
        try:
            with open(path, "rb") as f:
                key = f.read().strip()
        except OSError as exc:
            raise UserError(f"cannot read --authkey-file: {exc.strerror or exc}") from None
        if not key:
            raise UserError(f"--authkey-file {path} is empty")
        return key
    return resolve_authkey(None)


def address(text: str, what: str) -> tuple[str, int]:
    try:
        return _connection.parse_address(text)
    except ValueError as exc:
        raise UserError(f"{what}: {exc}") from None


def unreachable(where: tuple[str, int], exc: OSError) -> UserError:
    return UserError(
        f"cannot reach {_connection.format_address(where)}: {exc.strerror or exc}", EXIT_FAILURE
    )


def log_verbosity(verbosity: int, prefix: str = "pytaskqml") -> None:
    setup_logging(
        prefix,
        logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG,
    )
