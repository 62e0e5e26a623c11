"""Smoke version of the benchmark (tiny sizes) so that `benchmark/` cannot rot.

Runs the real harness on tiny sizes for multiprocessing, the pytaskqml systems and the frames
baselines (compute-only, raw-socket), checks that every correctness check passed and that a
result has the keys the report relies on, runs the CLI once, and exercises the failure paths
(unknown names, the time limit, a Celery worker that dies mid-run).  The Celery part skips
when Redis at 127.0.0.1:6379 does not answer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from benchmark import procstat
from benchmark.harness import RESULT_KEYS, HarnessOptions, run_case
from benchmark.systems import DEFAULT_REDIS_URL, SYSTEMS, CelerySession, Options, RunFailed

ROOT = Path(__file__).resolve().parent.parent

# On Python >= 3.12 forking a process that has threads (the harness' watchdog thread, the
# Coordinator's threads) warns; multiprocessing.Pool's fork is exactly what is being measured.
pytestmark = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded, use of fork:DeprecationWarning"
)


def tiny(**overrides: Any) -> HarnessOptions:
    opts = HarnessOptions(repeats=2, quick=True, time_limit=30.0)
    for key, value in overrides.items():
        setattr(opts, key, value)
    return opts


def assert_ok(result: dict[str, Any]) -> None:
    assert set(RESULT_KEYS) <= set(result), set(RESULT_KEYS) - set(result)
    assert result["status"] == "ok", result["error"]
    assert result["check"]["passed"], result["check"]
    assert result["check"]["checked"] > 0
    assert result["rate_per_s"] > 0
    assert len(result["rate_runs"]) == result["repeats"] == 2
    assert result["startup_s"] >= 0
    assert result["cpu_us_per_task"]["total"] >= 0
    assert result["machine"]["cores"] >= 1
    json.dumps(result)  # one JSON line per run


def redis_answers() -> bool:
    try:
        import redis
    except ImportError:
        return False
    client = redis.Redis(host="127.0.0.1", port=6379, socket_timeout=1, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


@pytest.mark.parametrize("system", ["mp-imap", "mp-imap-1"])
@pytest.mark.parametrize("workload", ["wordcount", "latency"])
def test_multiprocessing(system: str, workload: str) -> None:
    assert_ok(run_case(system, workload, 2, tiny()))


@pytest.mark.parametrize("system", ["pytaskqml-map", "pytaskqml-submit", "pytaskqml-threads"])
def test_pytaskqml(system: str) -> None:
    result = run_case(system, "wordcount", 2, tiny())
    assert_ok(result)
    assert result["params"]["library_statistics"]["failed"] == 0
    latency = run_case(system, "latency", 2, tiny())
    assert_ok(latency)
    assert latency["latency_us"]["samples"] == 2 * latency["n"]


@pytest.mark.slow
@pytest.mark.parametrize("system", ["executor-map", "executor-map-pool-chunks", "ppe-map"])
def test_the_executors(system: str) -> None:
    assert_ok(run_case(system, "wordcount", 2, tiny()))
    latency = run_case(system, "latency", 2, tiny())
    assert_ok(latency)
    assert latency["latency_us"]["samples"] == 2 * latency["n"]


def test_sleep_scaling_fields() -> None:
    result = run_case("pytaskqml-threads", "sleep", 4, tiny())
    assert_ok(result)
    assert result["ideal_rate_per_s"] == pytest.approx(400.0)
    assert 0 < result["efficiency"] <= 1.05


def test_latency_percentiles() -> None:
    result = run_case("mp-imap", "latency", 1, tiny())
    assert_ok(result)
    lat = result["latency_us"]
    assert 0 < lat["p50"] <= lat["p99"] <= lat["max"]


def test_frames_when_opencv_is_installed() -> None:
    pytest.importorskip("cv2", reason="OpenCV is only in benchmark/requirements.txt")
    assert_ok(run_case("mp-imap", "frames", 2, tiny(n=4)))


def test_frames_baselines_and_shared_memory() -> None:
    """The systems `python -m benchmark.frames` adds: the ceilings and pytaskqml with shared
    memory on and off, every result checked against the local reference, nothing left behind."""
    pytest.importorskip("cv2", reason="OpenCV is only in benchmark/requirements.txt")
    before = procstat.descendants(os.getpid())
    results = {
        system: run_case(system, "frames", 2, tiny())
        for system in ("compute-only", "raw-socket", "pytaskqml-map", "pytaskqml-map-socket")
    }
    for result in results.values():
        assert_ok(result)
    shared = results["pytaskqml-map"]["params"]
    assert shared["shared_memory"] is True
    assert shared["shared_buffers"] > 0, shared  # the frames really went through shared memory
    socket_only = results["pytaskqml-map-socket"]["params"]
    assert socket_only["shared_memory"] is False
    assert socket_only["shared_buffers"] in (None, 0), socket_only
    assert procstat.descendants(os.getpid()) - before == set()


def test_frames_produced_into_buffers_go_without_a_copy() -> None:
    pytest.importorskip("cv2", reason="OpenCV is only in benchmark/requirements.txt")
    result = run_case("pytaskqml-map-buffer", "frames", 2, tiny())
    assert_ok(result)
    stats = result["params"]["library_statistics"]
    # Every frame of the warm-up and the repeats went to the workers by reference.
    assert stats["buffers"]["lent"] >= result["n"] * result["repeats"], stats
    assert result["params"]["shared_buffers"] == 0  # nothing copied into a worker's segment
    assert run_case("pytaskqml-map-buffer", "wordcount", 2, tiny())["status"] == "skipped"


def test_frames_only_systems_skip_other_workloads() -> None:
    result = run_case("raw-socket", "wordcount", 2, tiny())
    assert result["status"] == "skipped"
    assert "frames" in result["skip_reason"]
    assert_ok(run_case("compute-only", "wordcount", 2, tiny()))


def test_frames_sizes_measures_both_transports() -> None:
    pytest.importorskip("numpy")
    from benchmark.frames import measure_size

    shared = measure_size(64 * 1024, True, 1, 1, 30.0, target_s=0.02)
    socket_only = measure_size(64 * 1024, False, 1, 1, 30.0, target_s=0.02)
    for result in (shared, socket_only):
        assert result["status"] == "ok", result["error"]
        assert result["rate_per_s"] > 0 and result["mb_per_s"] > 0
    assert shared["shared_buffers"] >= shared["tasks"]
    assert socket_only["shared_buffers"] is None


def test_frames_cli_help() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmark.frames", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "raw-socket" in proc.stdout and "--sizes" in proc.stdout


def test_window_benchmark_reports_a_rate() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmark.window", "--workers", "1", "--window", "8",
         "--n", "200", "--repeats", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "window=8 workers=1: median" in proc.stdout and "tasks/s" in proc.stdout


@pytest.mark.slow
def test_time_limit_fails_the_run_and_cleans_up() -> None:
    before = procstat.descendants(os.getpid())
    t0 = time.monotonic()
    # 200 tasks of 10 ms on 2 workers need ~1 s per repeat: a 1.5 s limit stops the run.
    result = run_case("mp-imap-1", "sleep", 2, tiny(n=200, time_limit=1.5))
    assert time.monotonic() - t0 < 15
    assert result["status"] == "failed"
    assert "time limit" in result["error"]
    assert procstat.descendants(os.getpid()) - before == set()


def test_missing_dependency_is_skipped() -> None:
    if SYSTEMS["ray"].missing() is None:
        pytest.skip("ray is installed here")
    result = run_case("ray", "wordcount", 2, tiny())
    assert result["status"] == "skipped"
    assert "ray" in result["skip_reason"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmark", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_prints_one_json_line_per_run() -> None:
    proc = run_cli("--system", "mp-imap", "--workload", "wordcount", "--quick", "--repeats", "2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    assert_ok(json.loads(lines[0]))


def test_cli_rejects_unknown_names() -> None:
    proc = run_cli("--system", "nope", "--workload", "wordcount")
    assert proc.returncode == 2
    message = proc.stderr.strip()
    assert len(message.splitlines()) == 1
    assert "'nope'" in message and "mp-imap" in message and "celery-seq" in message
    proc = run_cli("--system", "mp-imap", "--workload", "bogus")
    assert proc.returncode == 2
    assert "wordcount" in proc.stderr and "sleep" in proc.stderr


celery_needs_redis = pytest.mark.skipif(
    not redis_answers(), reason="Redis at 127.0.0.1:6379 does not answer a ping within 1 s"
)


@celery_needs_redis
@pytest.mark.slow
@pytest.mark.parametrize("system", ["celery", "celery-seq"])
def test_celery(system: str) -> None:
    assert_ok(run_case(system, "wordcount", 2, tiny(n=20)))


@celery_needs_redis
@pytest.mark.slow
def test_celery_worker_death_fails_the_run() -> None:
    before = procstat.descendants(os.getpid())
    deadline = time.monotonic() + 30
    session = CelerySession("sleep", 1, deadline, Options(redis_url=DEFAULT_REDIS_URL), seq=False)
    try:
        assert session.proc is not None
        os.killpg(session.proc.pid, 9)
        t0 = time.monotonic()
        with pytest.raises(RunFailed, match="celery worker exited"):
            session.run_batch([1, 2, 3], deadline)
        assert time.monotonic() - t0 < 10
    finally:
        session.close()
    assert procstat.descendants(os.getpid()) - before == set()


def test_the_two_stage_pipeline_system() -> None:
    pytest.importorskip("cv2", reason="OpenCV is only in benchmark/requirements.txt")
    result = run_case("pytaskqml-pipeline", "frames", 2, tiny())
    assert_ok(result)
    assert result["params"]["stages"] == "gray x1 -> blur+mean x1"
