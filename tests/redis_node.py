"""A coordinator process fed from a Redis queue, for the tests.

    python redis_node.py URL STREAM MODULE:CLASS PROCESSES CLAIM_IDLE [KWARGS_JSON]

Says ``ready`` on stderr once its workers are up, then prints its queue statistics as one JSON
line on stdout every 0.1 s until its stdin closes; then it shuts down.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
import threading

from pytaskqml import Coordinator
from pytaskqml.redis import RedisQueue


def main() -> None:
    url, stream, target, processes, claim_idle = sys.argv[1:6]
    kwargs = json.loads(sys.argv[6]) if len(sys.argv) > 6 else {}
    module, cls_name = target.split(":")
    cls = getattr(importlib.import_module(module), cls_name)
    q = RedisQueue(url, stream=stream, claim_idle=float(claim_idle))
    closed = threading.Event()

    def wait_stdin() -> None:
        sys.stdin.read()
        closed.set()

    with Coordinator(queue=q, name=f"node{processes}") as coord:
        coord.spawn(cls, processes=int(processes), kwargs=kwargs)
        print("ready", file=sys.stderr, flush=True)
        threading.Thread(target=wait_stdin, daemon=True).start()
        while not closed.wait(0.1):
            s = coord.statistics()
            print(json.dumps(dataclasses.asdict(s.queue)), flush=True)


if __name__ == "__main__":
    main()
