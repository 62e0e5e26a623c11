"""Pipelines from a TOML/JSON file: every problem reported, the plan of a dry run (which starts
nothing), and ``pytaskqml run`` end to end in a subprocess."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import child_env

from pytaskqml import Pipeline, TaskFailed
from pytaskqml.pipeline.config import ConfigError, build, check, load, plan, read

GOOD: dict[str, Any] = {
    "pipeline": {"name": "t", "steps": ["square", "fan", "last"], "buffersize": 16},
    "stages": {
        "square": {"worker": "sample_workers:Square", "threads": 2},
        "odd": {"worker": "pipeline_workers:FailOdd"},
        "tag": {"worker": "pipeline_workers:Tag", "kwargs": {"tag": "x"}},
        "last": {"worker": "sample_workers:Echo"},
    },
    "branches": {"fan": {"paths": {"odd": ["odd"], "tag": ["tag"]}, "timeout": 30.0}},
    "service": {"ingress": "127.0.0.1:7000", "control": "127.0.0.1:7100", "log_file": "t.log"},
}


def _run(*args: str, stdin: str = "", cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytaskqml", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=cwd,
        timeout=60,
    )


def test_a_good_config_has_no_problems_and_builds_the_pipeline() -> None:
    assert check(GOOD) == []
    with Pipeline(build(GOOD), buffersize=16) as p:
        out = list(p.map([1, 2]))
    assert out[0]["odd"] == {
        "error": "ValueError",
        "message": "odd item 1 (in stage 'odd')",
        "stage": "odd",
    }
    assert out[0]["tag"] == [1, "x"]
    assert out[1] == {"odd": 40, "tag": [4, "x"]}


def test_every_problem_is_listed_not_only_the_first() -> None:
    bad = json.loads(json.dumps(GOOD))
    bad["pipeline"]["steps"].append("nowhere")  # an unknown stage
    bad["branches"]["fan"]["join"] = ["odd", "missing"]  # an unmatched converge branch
    bad["stages"]["last"]["worker"] = "no_such_module_here:X"  # an import that fails
    bad["stages"]["square"]["threads"] = 0
    bad["service"]["ingress"] = "nohost"
    problems = check(bad)
    assert len(problems) == 5, problems
    assert any("'nowhere'" in p for p in problems)
    assert any("'missing'" in p for p in problems)
    assert any("no_such_module_here" in p for p in problems)


def test_cycles_duplicates_and_reused_stages_are_problems() -> None:
    doc: dict[str, Any] = {
        "pipeline": {"steps": ["a", "a"]},
        "stages": {"s": {"worker": "sample_workers:Echo"}},
        "branches": {
            "a": {"paths": {"x": ["b"]}},
            "b": {"paths": {"y": ["a"]}},
            "s": {"paths": {"z": ["s"]}},
        },
    }
    problems = check(doc)
    assert any("cycle a -> b -> a" in p for p in problems), problems
    assert any("duplicate name 's'" in p for p in problems), problems


def test_json_duplicate_keys_and_toml_on_old_pythons(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = tmp_path / "p.json"
    f.write_text('{"stages": {"a": {"worker": "m:A"}, "a": {"worker": "m:B"}}}')
    with pytest.raises(ConfigError, match="duplicate name 'a'"):
        read(f)
    t = tmp_path / "p.toml"
    t.write_text('[pipeline]\nsteps = ["a"]\n')
    monkeypatch.setattr(sys, "version_info", (3, 10, 0))
    with pytest.raises(ConfigError, match=r"needs Python 3\.11") as info:
        read(t)
    assert len(info.value.problems) == 1


def test_the_plan_shows_pools_and_ports() -> None:
    text = plan(GOOD)
    assert "stage square: sample_workers:Square on 2 threads" in text
    assert "branches fan (converge odd, tag by item, timeout 30.0s)" in text
    assert "ingress 127.0.0.1:7000" in text and "127.0.0.1:7100" in text


TOML = """
[pipeline]
steps = ["first", "marked"]

[stages.first]
worker = "sample_workers:Square"

[stages.marked]
worker = "pipeline_workers:Marker"
processes = 2
kwargs = {{ marker = "{marker}" }}
"""


@pytest.mark.slow
def test_a_dry_run_prints_the_plan_and_starts_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "built"
    cfg = tmp_path / "p.toml"
    cfg.write_text(TOML.format(marker=marker))
    done = _run("run", str(cfg), "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "stage marked: pipeline_workers:Marker on 2 spawned processes" in done.stdout
    assert "would start: 2 processes" in done.stdout
    assert not marker.exists()  # no worker was built, here or in a child
    # The same file run for real builds them: the marker is a working proof.
    done = _run("run", str(cfg), stdin="3\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["9"]
    assert len(marker.read_text().split()) == 2


@pytest.mark.slow
def test_a_dry_run_with_three_mistakes_prints_three_lines_and_exits_2(tmp_path: Path) -> None:
    doc = json.loads(json.dumps(GOOD))
    doc["pipeline"]["steps"].append("nowhere")
    doc["branches"]["fan"]["join"] = ["odd", "missing"]
    doc["stages"]["last"]["worker"] = "sample_workers:NoSuchClass"
    cfg = tmp_path / "p.json"
    cfg.write_text(json.dumps(doc))
    done = _run("run", str(cfg), "--dry-run")
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 3, lines
    assert done.stdout == ""


@pytest.mark.slow
def test_run_writes_one_result_per_line_in_order(tmp_path: Path) -> None:
    cfg = tmp_path / "p.json"
    doc = {
        "pipeline": {"steps": ["square", "tag"]},
        "stages": {
            "square": {"worker": "sample_workers:Square", "processes": 2},
            "tag": {"worker": "pipeline_workers:Tag", "threads": 2, "kwargs": {"tag": "t"}},
        },
    }
    cfg.write_text(json.dumps(doc))
    items = tmp_path / "in.jsonl"
    items.write_text("".join(f"{i}\n" for i in range(300)) + '"text"\n')
    done = _run("run", str(cfg), "--input", str(items))
    assert done.returncode == 1  # one item failed
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert rows[:300] == [[i * i, "t"] for i in range(300)]
    assert rows[300]["stage"] == "square" and rows[300]["error"] == "TypeError"
    assert "1 item(s) failed" in done.stderr
    help_text = _run("run", "--help")
    assert help_text.returncode == 0 and "--dry-run" in help_text.stdout


def test_load_raises_with_every_problem(tmp_path: Path) -> None:
    cfg = tmp_path / "p.json"
    cfg.write_text(json.dumps({"pipeline": {"steps": ["x"]}, "extra": 1}))
    with pytest.raises(ConfigError) as info:
        load(cfg)
    assert len(info.value.problems) == 2
    assert TaskFailed  # exported beside Pipeline


def test_a_stage_can_be_a_named_model() -> None:
    doc = {
        "pipeline": {"steps": ["tag", "above"]},
        "stages": {
            "tag": {"worker": "pipeline_workers:Pause", "threads": 1},
            "above": {
                "model": "detector",
                "load": "pytaskqml.examples:Threshold",
                "config": {"threshold": 0.5},
                "version": "7",
                "threads": 2,
            },
        },
    }
    assert check(doc) == []
    assert "serving model detector" in plan(doc)
    with Pipeline(build(doc)) as p:
        assert list(p.map([0.2, 0.9, 0.7])) == [False, True, True]
        (detector,) = p.statistics().stages["above"].models
        assert detector.version == "7"
        assert dict(detector.results) == {"7": 3}


def test_model_stage_mistakes_are_each_reported() -> None:
    doc = {
        "pipeline": {"steps": ["a", "b"]},
        "stages": {
            "a": {"load": "pytaskqml.examples:Threshold"},
            "b": {"model": "m", "load": "pytaskqml.examples:Echo", "config": 3},
        },
    }
    problems = check(doc)
    assert any("a: load needs model" in p for p in problems)
    assert any("Echo is not a Model subclass" in p for p in problems)
    assert any("b: config must be a table" in p for p in problems)


def _chain(n: int, *, closed: bool) -> dict[str, Any]:
    """Branches b0 .. b(n-1), each with two paths to the next: 2**n routes from b0 to the end
    (and, if *closed*, the last leads back to b0)."""
    branches: dict[str, Any] = {}
    for i in range(n):
        nxt = f"b{i + 1}" if i + 1 < n else "b0"
        branches[f"b{i}"] = {"paths": {"x": [nxt], "y": [nxt]}}
    if not closed:
        branches[f"b{n - 1}"] = {"paths": {"x": ["s"]}}
    return {
        "pipeline": {"steps": ["b0"]},
        "stages": {"s": {"worker": "sample_workers:Echo"}},
        "branches": branches,
    }


@pytest.mark.parametrize("closed", [False, True])
def test_the_cycle_check_is_linear_in_a_chain_of_fan_outs(closed: bool) -> None:
    """40 levels of two paths each took over a minute when every route was searched."""
    out: list[list[str]] = []
    t = threading.Thread(target=lambda: out.append(check(_chain(2000, closed=closed))))
    t.daemon = True
    t.start()
    t.join(20)
    assert out, "the check of 2000 chained branches still running after 20 s"
    problems = out[0]
    # Every path that names branches is a problem; the closing steps are named as a cycle.
    assert len(problems) == 2 * (2000 if closed else 1999)
    cycles = [p for p in problems if "cycle" in p]
    assert len(cycles) == (2 if closed else 0)
    if closed:
        assert cycles[0].startswith("branches.b1999: cycle b0 -> b1 -> ")
        assert cycles[0].endswith(" -> b1999 -> b0")


def test_the_cycle_check_finds_every_loop_and_only_loops() -> None:
    doc: dict[str, Any] = {
        "pipeline": {"steps": ["a"]},
        "stages": {"s": {"worker": "sample_workers:Echo"}},
        "branches": {
            "a": {"paths": {"p": ["b"], "q": ["c"]}},
            "b": {"paths": {"p": ["c"]}},
            "c": {"paths": {"p": ["s"], "q": ["a"]}},
            "d": {"paths": {"p": ["d"]}},
        },
    }
    cycles = sorted(p for p in check(doc) if "cycle" in p)
    assert cycles == [
        "branches.c: cycle a -> b -> c -> a",
        "branches.d: cycle d -> d",
    ]


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("deep.json", "[" * 100_000 + "]" * 100_000),
        ("deep-object.json", '{"a":' * 100_000 + "1" + "}" * 100_000),
        ("deep.toml", "a = " + "[" * 50_000 + "]" * 50_000 + "\n"),
        ("deep-table.toml", "a = " + "{b=" * 50_000 + "1" + "}" * 50_000 + "\n"),
        ("dotted.toml", "a." + ".".join(["b"] * 100) + " = 1\n"),
    ],
)
def test_a_config_nested_too_deep_is_one_line_not_a_traceback(
    tmp_path: Path, name: str, text: str
) -> None:
    if name.endswith(".toml") and sys.version_info < (3, 11):
        pytest.skip("TOML needs Python 3.11")
    cfg = tmp_path / name
    cfg.write_text(text)
    with pytest.raises(ConfigError, match="nests deeper than 64 levels") as info:
        read(cfg)
    assert len(info.value.problems) == 1


@pytest.mark.slow
def test_a_dry_run_of_a_deep_config_prints_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "deep.json"
    cfg.write_text("[" * 100_000 + "]" * 100_000)
    done = _run("run", str(cfg), "--dry-run")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"pytaskqml: error: {cfg}: nests deeper than 64 levels"
    ], done.stderr


def test_counts_are_bounded_to_what_a_machine_could_run() -> None:
    doc = json.loads(json.dumps(GOOD))
    doc["pipeline"]["buffersize"] = 10**30
    doc["stages"]["square"].update(processes=10**18, threads=10**9, window=10**6)
    doc["stages"]["odd"].update(max_queue=10**8, max_retries=10**6, timeout=1e300)
    problems = check(doc)
    for needle in (
        "pipeline: buffersize must be a positive integer, at most 10000000",
        "stages.square: processes must be a positive integer or [min, max], at most 1024",
        "stages.square: threads must be a positive integer or [min, max], at most 4096",
        "stages.square: window must be a positive integer, at most 65536",
        "stages.odd: max_queue must be a positive integer, at most 10000000",
        "stages.odd: max_retries must be an integer from 0 to 1000",
        "stages.odd: timeout must be a positive number of seconds",
    ):
        assert needle in "\n".join(problems), (needle, problems)
    assert len(problems) == 7, problems
    # Each stage within its limit, all of them together beyond it.
    doc = json.loads(json.dumps(GOOD))
    for name in ("square", "tag", "last"):
        doc["stages"][name]["processes"] = [1, 1000]
    assert check(doc) == ["the stages would start up to 3000 processes in all: at most 1024"]
    assert check(GOOD) == []


def test_an_infinite_timeout_in_toml_is_refused(tmp_path: Path) -> None:
    if sys.version_info < (3, 11):
        pytest.skip("TOML needs Python 3.11")
    cfg = tmp_path / "p.toml"
    cfg.write_text(
        '[pipeline]\nsteps = ["a"]\n[stages.a]\nworker = "sample_workers:Echo"\ntimeout = inf\n'
    )
    assert check(read(cfg)) == [
        "stages.a: timeout must be a positive number of seconds, at most 3.1536e+07"
    ]


# ======================================================== the command as a console script runs it

# What the `pytaskqml` console script is: a file outside the user's directory calling main(),
# so sys.path[0] is that file's folder, not the current directory (unlike `python -m`).
SCRIPT = "import sys\nfrom pytaskqml.cli.main import main\nsys.exit(main())\n"


def _script(tmp_path: Path) -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "pytaskqml").write_text(SCRIPT)
    return [sys.executable, str(bin_dir / "pytaskqml")]


def test_the_console_script_imports_the_users_module_from_the_current_directory(
    tmp_path: Path,
) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "myapp_t23.py").write_text("def lower(s):\n    return s.lower()\n")
    doc = {
        "pipeline": {"steps": ["lower", "again"]},
        "stages": {
            "lower": {"worker": "myapp_t23:lower", "threads": 1},
            "again": {"worker": "myapp_t23:lower", "processes": 1},  # a child process too
        },
    }
    (app / "words.json").write_text(json.dumps(doc))
    done = subprocess.run(
        [*_script(tmp_path), "run", "words.json"],
        input='"HeLLo"\n"WORLD"\n', capture_output=True, text=True, env=child_env(), cwd=app,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ['"hello"', '"world"']
    for command in ("run", "serve", "worker"):
        shown = subprocess.run(
            [*_script(tmp_path), command, "--help"],
            capture_output=True, text=True, env=child_env(), timeout=60,
        )  # fmt: skip
        assert "current directory" in " ".join(shown.stdout.split()), command


def test_a_model_that_fails_to_load_ends_the_run_with_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "m.json"
    doc = {
        "pipeline": {"steps": ["m"]},
        "stages": {"m": {"model": "det", "load": "model_workers:Broken", "processes": 1}},
    }
    cfg.write_text(json.dumps(doc))
    done = _run("run", str(cfg), stdin="1\n")
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("pytaskqml: error")]
    want = "model 'det' version '1' failed to load: RuntimeError: weights file is corrupt"
    assert len(errors) == 1 and want in errors[0], done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    verbose = _run("run", str(cfg), "--verbose", stdin="1\n")
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr, verbose.stderr


@pytest.mark.parametrize("verbose", [False, True])
def test_ctrl_c_stops_a_run_with_one_line_and_exit_code_130(tmp_path: Path, verbose: bool) -> None:
    cfg = tmp_path / "slow.json"
    doc = {"pipeline": {"steps": ["s"]}, "stages": {"s": {"worker": "sample_workers:Sleepy"}}}
    cfg.write_text(json.dumps(doc))
    items = tmp_path / "in.jsonl"
    items.write_text("0.001\n" + "0.2\n" * 500)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytaskqml", "run", str(cfg), "--input", str(items)]
        + (["--verbose"] if verbose else []),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline()  # running: the first result is out
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 130, err
    if verbose:
        assert "Traceback" in err and "KeyboardInterrupt" in err
    else:
        assert err.strip() == "pytaskqml: interrupted", err
