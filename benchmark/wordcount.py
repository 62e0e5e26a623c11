"""The seed's workload on its own: ``python -m benchmark.wordcount``.

Each task is one random word of apple/banana/cherry/grape/kiwi/orange and its result is
``{word: 1}``; the results are summed and checked against the input. Runs pytaskqml's ordered
``map()`` and ``submit()`` with 2 spawned workers next to ``multiprocessing.Pool.imap`` through
the benchmark harness (start-up excluded, warm-up, repeats, every result checked) and prints one
JSON line per system. Extra arguments go to ``python -m benchmark`` (e.g. ``--n 500000``).
"""

from __future__ import annotations

import sys

from benchmark.__main__ import main

SYSTEMS = "pytaskqml-map,pytaskqml-submit,mp-imap"


def run(argv: list[str]) -> int:
    return main(["--system", SYSTEMS, "--workload", "wordcount", "--workers", "2", *argv])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
