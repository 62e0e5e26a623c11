"""``pytaskqml token``: the bearer token of control endpoints that use a key, for a scraper's
configuration or the status page's address."""

from __future__ import annotations

import argparse
from typing import Any

from ..wire import connection as _connection
from ..wire import protocol as _protocol
from .common import UserError, add_key_args, address, read_key


def register(sub: Any) -> None:
    t = sub.add_parser(
        "token",
        help="print the control endpoints' bearer token derived from the key",
        description="Print the read token that control endpoints started with this key require "
        "(Authorization: Bearer TOKEN) on /status and /metrics - what a scraper or the status "
        "page needs; it cannot act. --act prints the token for the routes that act (/shutdown, "
        "/models/load, /submit, /map). With --url, print the status page's address with the "
        "token in its fragment instead.",
    )
    add_key_args(t)
    t.add_argument(
        "--act",
        action="store_true",
        help="the act token (/shutdown, /models/*, /submit, /map; it reads too)",
    )
    t.add_argument("--url", metavar="HOST:PORT", help="print http://HOST:PORT/#token=TOKEN")
    t.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    key = read_key(args.authkey_file)
    if key is None:
        raise UserError("no key: set PYTASKQML_AUTHKEY or pass --authkey-file")
    token = _protocol.control_token(key, "act" if args.act else "read")
    if args.url:
        where = _connection.format_address(address(args.url, "--url"))
        print(f"http://{where}/#token={token}")
    else:
        print(token)
    return 0
