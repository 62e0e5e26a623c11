"""The Celery application the benchmark's Celery worker runs (``celery -A benchmark.celery_app``).

Broker and result backend are the same Redis; the URL (with its own DB number) and the queue
name come from the environment so that every benchmark run uses its own queue.  JSON only:
frames travel base64-encoded, as they must with the JSON serializer.
"""

from __future__ import annotations

import base64
import os
from typing import Any

from celery import Celery

from benchmark import workloads

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
QUEUE = os.environ.get("BENCH_CELERY_QUEUE", "pytaskqml-bench")

app = Celery("benchmark", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_default_queue=QUEUE,
    result_expires=3600,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    # Fail fast when Redis goes away (the default retries 20 times, 1 s apart): a benchmark run
    # whose Redis died should fail with a message, not linger.  No effect while Redis is up.
    result_backend_transport_options={
        "retry_policy": {"max_retries": 2, "interval_start": 0, "interval_step": 0.5}
    },
)


def encode_frame(frame: Any) -> dict[str, Any]:
    return {
        "shape": list(frame.shape),
        "dtype": str(frame.dtype),
        "b64": base64.b64encode(frame.tobytes()).decode("ascii"),
    }


def decode_frame(payload: dict[str, Any]) -> Any:
    import numpy as np

    raw = base64.b64decode(payload["b64"])
    return np.frombuffer(raw, dtype=payload["dtype"]).reshape(payload["shape"])


@app.task(name="bench.wordcount")
def wordcount(word: str) -> dict[str, int]:
    return workloads.task_wordcount(word)


@app.task(name="bench.frame")
def frame(payload: dict[str, Any]) -> float:
    return workloads.task_frame(decode_frame(payload))


@app.task(name="bench.echo")
def echo(payload: Any) -> Any:
    return workloads.task_echo(payload)


@app.task(name="bench.sleep")
def sleep(index: int) -> int:
    return workloads.task_sleep(index)


TASKS = {"wordcount": wordcount, "frame": frame, "echo": echo, "sleep": sleep}
