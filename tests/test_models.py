"""Named models on running workers, broadcasts and key affinity, with real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import Procs, child_env, free_port, pid_alive, read_line_with, wait_for
from model_workers import Broken, Scale, Tracker, Upper
from sample_workers import Echo, History

from pytaskqml import Coordinator, WorkerStartError
from pytaskqml.core import ModelResult
from pytaskqml.errors import ModelLoadError
from pytaskqml.worker import ModelWorker

T = 30.0


def test_two_models_interleaved_in_one_ordered_map_on_processes_and_threads() -> None:
    with Coordinator() as coord:
        coord.spawn(Echo, processes=2)
        coord.add_local(Echo(), threads=1)
        assert set(coord.models.load("scale", Scale, config={"factor": 10}).values()) == {"loaded"}
        coord.models.load("upper", Upper)
        items: list[Any] = [i if i % 2 else f"w{i}" for i in range(300)]
        out = list(coord.map(items, model=lambda x: "scale" if isinstance(x, int) else "upper"))
    for item, got in zip(items, out, strict=True):
        if isinstance(item, int):
            assert got[0] == item * 10
        else:
            assert got == item.upper()
    stats = {m.name: m for m in coord.statistics().models}
    assert sum(n for _, n in stats["scale"].results) == 150
    assert sum(n for _, n in stats["upper"].results) == 150


def test_an_update_during_a_stream_loses_nothing_and_never_goes_back_a_version() -> None:
    n = 20_000
    with Coordinator() as coord:
        coord.spawn(Echo, processes=2)
        coord.add_local(Echo(), threads=1)
        coord.models.load("scale", Scale, config={"factor": 1}, version="v1")
        stream = coord.stream(model="scale", with_meta=True, buffersize=256)
        got: list[ModelResult] = []
        done = threading.Event()

        def consume() -> None:
            got.extend(stream)
            done.set()

        threading.Thread(target=consume, daemon=True).start()
        for i in range(n):
            stream.put(i)
            if i == n // 4:
                assert set(coord.models.update("scale", Scale, config={"factor": 1},
                                               version="v2").values()) == {"loaded"}  # fmt: skip
        stream.close()
        assert done.wait(T * 2)
    assert [r.value[0] for r in got] == list(range(n))  # all, once each, in order
    assert {r.version for r in got} == {"v1", "v2"}
    by_worker: dict[str, list[str]] = {}
    for r in got:  # within a worker, submission order is the order it ran them
        by_worker.setdefault(r.worker, []).append(r.version)
    for versions in by_worker.values():
        first_v2 = versions.index("v2") if "v2" in versions else len(versions)
        assert "v1" not in versions[first_v2:], "an old-version result after the switch"


def test_a_restarted_worker_has_the_model_before_its_first_task() -> None:
    with Coordinator() as coord:
        (pid,) = coord.spawn(Echo, processes=1)
        coord.models.load("scale", Scale, config={"factor": 2})
        assert coord.submit(4, model="scale").result(T)[0] == 8
        os.kill(pid, signal.SIGKILL)
        futures = [coord.submit(i, model="scale") for i in range(20)]  # while it is down
        results = [f.result(T) for f in futures]
    assert [r[0] for r in results] == [2 * i for i in range(20)]
    assert {r[1] for r in results} != {pid}  # the replacement ran them, with the model


def test_a_load_that_fails_leaves_the_old_version_serving() -> None:
    with Coordinator() as coord:
        coord.spawn(Echo, processes=1)
        coord.models.load("scale", Scale, config={"factor": 3}, version="good")
        with pytest.raises(ModelLoadError, match="weights file is corrupt"):
            coord.models.update("scale", Broken, version="bad")
        assert coord.submit(2, model="scale", with_meta=True).result(T).version == "good"
        # The status shows both: the version that serves, and the update that failed.
        (state,) = coord.models.status()["scale"].values()
        assert state["state"] == "loaded" and state["version"] == "good", state
        update = state["update"]
        assert update["state"] == "failed" and update["version"] == "bad", state
        assert "weights file is corrupt" in update["error"]
        stats = {m.name: m for m in coord.statistics().models}["scale"]
        assert stats.failed and "corrupt" in stats.failed[0][1]
        assert [v for _, v in stats.ready] == ["good"]
        # A later update that works replaces both.
        coord.models.update("scale", Scale, config={"factor": 5}, version="fixed")
        (state,) = coord.models.status()["scale"].values()
        assert state == {"state": "loaded", "version": "fixed"}


def test_a_model_load_error_names_the_model_the_version_and_the_cause() -> None:
    with Coordinator() as coord:
        (pid,) = coord.spawn(Echo, processes=1)
        with pytest.raises(ModelLoadError) as info:
            coord.models.load("detector", Broken, version="3")
    err = info.value
    assert isinstance(err, WorkerStartError)  # `except WorkerStartError` around a start
    assert (err.model, err.version) == ("detector", "3")
    assert list(err.errors.values()) == ["RuntimeError: weights file is corrupt"]
    assert str(err) == (
        f"model 'detector' version '3' failed to load: RuntimeError: weights file is corrupt "
        f"(on Echo-{pid})"
    ), str(err)


def test_tasks_for_a_model_nobody_could_load_fail_with_the_reason() -> None:
    with Coordinator() as coord:
        coord.spawn(Echo, processes=1)
        with pytest.raises(ModelLoadError):
            coord.models.load("broken", Broken)
        with pytest.raises(ValueError, match=r"failed to load on every worker.*corrupt"):
            coord.submit(1, model="broken")
        with pytest.raises(ValueError, match="no model named"):
            coord.submit(1, model="never-loaded")


def test_a_worker_refuses_a_class_outside_its_allow_list_and_imports_nothing(
    procs: Procs, tmp_path: Path
) -> None:
    models = tmp_path / "models.json"
    spec = {"allow": ["model_workers:Scale"], "models": {"upper": {"class": "model_workers:Upper"}}}
    models.write_text(json.dumps(spec))
    mark = tmp_path / "imported"
    port = free_port()
    worker = procs.cli(
        "worker", "--models", str(models), "--listen", f"127.0.0.1:{port}", "--no-control",
        env=child_env(PYTASKQML_TEST_IMPORT_MARK=str(mark)),
    )  # fmt: skip
    read_line_with(worker, "listening on")
    with Coordinator() as coord:
        coord.connect(("127.0.0.1", port), timeout=T)
        assert coord.submit("hi", model="upper").result(T) == "HI"  # from its file
        assert coord.models.load("scale", "model_workers:Scale") != {}  # allowed
        with pytest.raises(ModelLoadError, match="allow-list"):
            coord.models.load("marked", "import_marker:Marked")
        (state,) = coord.models.status()["marked"].values()
        assert "PermissionError" in state["error"]
    assert not mark.exists(), "the worker imported a module it was not allowed to"


def test_models_load_on_demand_and_the_least_recently_used_one_makes_room() -> None:
    with Coordinator(max_models=2) as coord:
        coord.spawn(ModelWorker, processes=1)
        for name, factor in (("a", 1), ("b", 2), ("c", 3)):
            coord.models.load(name, Scale, config={"factor": factor})
        for _ in range(3):
            for name, factor in (("a", 1), ("b", 2), ("c", 3)):
                assert coord.submit(5, model=name).result(T)[0] == 5 * factor
        stats = {m.name: m for m in coord.statistics().models}
    assert sum(m.loads for m in stats.values()) >= 4  # more loads than models: it swapped
    assert sum(m.unloads for m in stats.values()) >= 2


def test_a_key_stays_on_its_worker_until_that_worker_dies_then_moves_once() -> None:
    keys = [f"camera-{i}" for i in range(8)]
    with Coordinator() as coord:
        pids = coord.spawn(Echo, processes=3)
        coord.models.load("track", Tracker)
        first = [
            coord.submit([k, n], model="track", key=k).result(T) for n in range(5) for k in keys
        ]
        owner = {}
        for key, _, pid, _, _ in first:
            assert owner.setdefault(key, pid) == pid  # one worker per key
        assert len(set(owner.values())) >= 2  # and the keys are spread
        victim = max(set(owner.values()), key=list(owner.values()).count)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: not pid_alive(victim), T, "the worker to die")
        later = [
            coord.submit([k, n], model="track", key=k).result(T) for n in range(5) for k in keys
        ]
    moved = {k for k, p in owner.items() if p == victim}
    new_owner: dict[str, int] = {}
    for key, n, pid, count, told in later:
        assert new_owner.setdefault(key, pid) == pid  # still one worker per key
        if key not in moved:
            assert pid == owner[key]  # keys of the living workers did not move
        else:
            assert pid != victim and told  # the new worker was told (key_moved)
            assert count == n + 1  # and rebuilt its state from there
    assert moved and all(p in pids for p in new_owner.values())


def test_broadcast_runs_on_every_worker_and_a_retained_one_on_newcomers_first() -> None:
    with Coordinator() as coord:
        coord.spawn(History, processes=2)
        coord.add_local(History())
        result = coord.broadcast("threshold=0.7", retain=True)
        assert len(result.results) == 3
        assert all(seen == ["threshold=0.7"] for seen in result.results.values())
        one = coord.broadcast("ping", mode="any")
        assert len(one.results) == 1 and next(iter(one.results.values()))[-1] == "ping"
        (pid,) = coord.spawn(History, processes=1)  # joins: the retained broadcast comes first
        futures = [coord.submit(f"task-{i}") for i in range(20)]  # tasks waiting meanwhile
        everyone = coord.broadcast("who")
        assert len(everyone.results) == 4
        newcomer = next(seen for name, seen in everyone.results.items() if str(pid) in name)
        assert newcomer[0] == "threshold=0.7" and newcomer[-1] == "who"
        assert coord.withdraw(result.id or 0) and not coord.withdraw(result.id or 0)
        [f.result(T) for f in futures]
        os.kill(pid, signal.SIGKILL)  # a replacement after the withdrawal: no replay
        assert coord.wait_until(lambda s: s.restarts >= 1 and len(s.workers) == 4, T)
        again = coord.broadcast("after")
        assert sorted(len(seen) == 1 for seen in again.results.values()).count(True) == 1


def test_the_models_command_lists_loads_and_unloads(tmp_path: Path) -> None:
    with Coordinator() as coord:
        coord.spawn(Echo, processes=1)
        host, port = coord.serve_control(
            keyless_actions=True, allow_models=["model_workers:Scale", "model_workers:Broken"]
        )

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "pytaskqml", "models", f"{host}:{port}", *args],
                env=child_env(), capture_output=True, text=True, timeout=T,
            )  # fmt: skip

        loaded = cli("load", "scale", "model_workers:Scale", "--config", '{"factor": 4}',
                     "--version", "7")  # fmt: skip
        assert loaded.returncode == 0 and "loaded" in loaded.stdout, loaded.stderr
        assert coord.submit(2, model="scale").result(T)[0] == 8
        listed = cli("list")
        assert listed.returncode == 0 and "scale" in listed.stdout and "7" in listed.stdout
        assert cli("unload", "scale").returncode == 0
        assert coord.models.list() == {}
        bad = cli("load", "x", "model_workers:Broken")
        assert bad.returncode == 1 and "corrupt" in bad.stderr
        other = cli("load", "y", "model_workers:Upper")  # importable, but not allowed
        assert other.returncode == 1 and "403" in other.stderr and "allow list" in other.stderr
        # A name nobody knows is an error, not "unloaded".
        missing = cli("unload", "nosuch")
        assert missing.returncode == 1, (missing.stdout, missing.stderr)
        assert "no model named 'nosuch'" in missing.stderr and "unloaded" not in missing.stdout


def test_the_models_command_takes_its_options_anywhere(tmp_path: Path) -> None:
    key = b"k" * 32
    keyfile = tmp_path / "key"
    keyfile.write_bytes(key)
    with Coordinator(authkey=key) as coord:
        coord.spawn(Echo, processes=1)
        host, port = coord.serve_control(allow_models=["model_workers:Scale"])
        where = f"{host}:{port}"

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "pytaskqml", "models", *args],
                env=child_env(), capture_output=True, text=True, timeout=T,
            )  # fmt: skip

        key_opt = ("--authkey-file", str(keyfile))
        before = cli(*key_opt, "--timeout", "20", where, "load", "s", "model_workers:Scale")
        assert before.returncode == 0, before.stderr
        after = cli(where, "list", "--json", *key_opt, "--timeout", "20")
        assert after.returncode == 0, after.stderr
        assert json.loads(after.stdout)["models"] == {"s": "1"}
        between = cli(where, *key_opt, "unload", "s", "--timeout", "5")
        assert between.returncode == 0, between.stderr
        assert coord.models.list() == {}


def test_tasks_queued_before_an_unload_fail_saying_so_and_a_reload_serves_again() -> None:
    """Tasks of a model already sent to its worker processes, or still waiting in the
    coordinator, when the model is unloaded: each gets its result or fails with the unload as
    its reason, never a bare "is not loaded here"."""
    with Coordinator() as coord:
        coord.spawn(Echo, processes=2)
        coord.models.load("m", Scale, config={"factor": 2})
        futures = [coord.submit(i, model="m") for i in range(400)]
        coord.models.unload("m")
        outcomes: dict[str, int] = {}
        for i, f in enumerate(futures):
            exc = f.exception(T)
            if exc is None:
                assert f.result()[0] == 2 * i
                key = "ok"
            else:
                key = f"{type(exc).__name__}: {exc}"
            outcomes[key] = outcomes.get(key, 0) + 1
        # Waiting in the coordinator: ClosedError. Sent to a worker the unload reached
        # first: that worker's LookupError, which says the same.
        unloaded = {
            "ClosedError: model 'm' was unloaded before this task ran",
            "TaskFailed: LookupError: model 'm' was unloaded before this task ran",
        }
        assert set(outcomes) <= {"ok", *unloaded}, outcomes
        assert sum(outcomes.get(u, 0) for u in unloaded) > 0, outcomes  # it cut into work
        with pytest.raises(ValueError, match="no model named 'm'"):
            coord.submit(1, model="m")
        coord.models.load("m", Scale, config={"factor": 3})
        assert [f.result(T)[0] for f in [coord.submit(i, model="m") for i in range(20)]] == [
            3 * i for i in range(20)
        ]
