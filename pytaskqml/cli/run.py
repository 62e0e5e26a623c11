"""``pytaskqml run CONFIG``: run a pipeline described in a file (see :mod:`._pipeconfig`) over
one JSON value per input line, writing one JSON result per line in the same order; with
``--dry-run``, check it and print the plan without starting anything."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from typing import IO, Any

from ..core.tasks import TaskTimeout
from ..engine.progress import open_bar
from ..errors import ClosedError, WorkerStartError
from ..pipeline import config as _pipeconfig
from ..pipeline.pipeline import Pipeline
from ..pipeline.stages import plain
from .common import (
    EXIT_FAILURE,
    EXIT_USAGE,
    UserError,
    add_key_args,
    log_verbosity,
    read_key,
)


def register(sub: Any) -> None:
    r = sub.add_parser(
        "run",
        help="run a pipeline from a TOML/JSON file over JSON lines",
        description="Run the pipeline CONFIG describes (TOML on Python 3.11+, or JSON) over "
        "one JSON value per line of --input, writing one JSON result per line to stdout, in "
        'input order. A failed item\'s line is {"error": TYPE, "message": TEXT, "stage": '
        'NAME}, a timed-out one\'s {"timeout": SECONDS}. --dry-run checks the file (graph, '
        "imports, options), prints the plan and starts nothing: exit code 2 and one line per "
        "problem if it has any. Workers named MODULE:NAME are imported from the current "
        "directory first. A stage that cannot start (a model whose load() raises, an import "
        "error) ends the run with one line and exit code 1; Ctrl-C with exit code 130.",
    )
    r.add_argument("config", metavar="CONFIG", help="the pipeline file (.toml or .json)")
    r.add_argument(
        "--input",
        "-i",
        metavar="FILE",
        default="-",
        help="JSON lines to read items from (default -: stdin)",
    )
    r.add_argument("--dry-run", action="store_true", help="check and print the plan only")
    r.add_argument("--buffersize", type=int, metavar="N", help="items in flight at most")
    r.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log more, and show the traceback of an error that stops the run",
    )
    add_key_args(r)
    r.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        doc = _pipeconfig.read(args.config)
    except _pipeconfig.ConfigError as exc:
        raise UserError(exc.problems[0], code=EXIT_USAGE) from None
    problems = _pipeconfig.check(doc)
    if problems:
        for line in problems:
            print(f"pytaskqml: {args.config}: {line}", file=sys.stderr)
        return EXIT_USAGE
    if args.dry_run:
        print(_pipeconfig.plan(doc))
        return 0
    source: IO[str]
    if args.input == "-":
        source = sys.stdin
    else:
        try:
            source = open(args.input, encoding="utf-8")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise UserError(f"cannot read {args.input}: {exc.strerror or exc}") from None
    key = read_key(args.authkey_file)
    if args.verbose:
        log_verbosity(args.verbose)
    failed = 0
    try:
        pipe = doc["pipeline"]
        with Pipeline(
            _pipeconfig.build(doc, authkey=key),
            name=pipe.get("name", "pipeline"),
            buffersize=args.buffersize or pipe.get("buffersize", 64),
        ) as p:
            bar = open_bar(True, None)
            done = 0
            try:
                for value in p.map(_lines(source), on_error="return"):
                    if isinstance(value, BaseException | TaskTimeout):
                        row = plain({"r": value})["r"]
                        failed += 1
                    else:
                        row = plain(value) if isinstance(value, dict) else value
                    sys.stdout.write(json.dumps(row) + "\n")
                    done += 1
                    if bar is not None:
                        bar.update_to(done)
            finally:
                if bar is not None:
                    bar.close()
            sys.stdout.flush()
    except BadLine as exc:
        raise UserError(str(exc)) from None
    except (ClosedError, WorkerStartError) as exc:  # ModelLoadError too: a model stage's load
        raise UserError(str(exc), EXIT_FAILURE) from exc
    finally:
        if source is not sys.stdin:
            source.close()
    if failed:
        print(f"pytaskqml: {failed} item(s) failed", file=sys.stderr)
        return EXIT_FAILURE
    return 0


class BadLine(ValueError):
    pass


def _lines(source: IO[str]) -> Iterator[Any]:
    for n, line in enumerate(source, 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except ValueError as exc:
            raise BadLine(f"input line {n} is not JSON: {exc}") from None
