"""The top-level package: a small front door, loaded without NumPy or the features, and the
names that moved still served (for one release) with a DeprecationWarning."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

import pytaskqml

FRONT_DOOR = {
    "Branches",
    "Client",
    "ClosedError",
    "Coordinator",
    "Executor",
    "LateResult",
    "Model",
    "NoWorkersError",
    "Pipeline",
    "PyTaskQMLError",
    "Stage",
    "Statistics",
    "TaskFailed",
    "TaskTimeout",
    "Worker",
    "WorkerLostError",
    "WorkerStartError",
    "__version__",
    "load",
    "spill",
}


def test_the_front_door_exports_these_names() -> None:
    assert set(pytaskqml.__all__) == FRONT_DOOR
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a front-door name never warns
        for name in FRONT_DOOR:
            assert getattr(pytaskqml, name) is not None


def test_import_pytaskqml_loads_no_numpy_and_no_feature() -> None:
    code = (
        "import sys, pytaskqml\n"
        "features = ('pipeline', 'redis', 'observe', 'service', 'cli')\n"
        "loaded = sorted(m for m in sys.modules if m == 'numpy' or m == 'redis'\n"
        "                or m.split('.')[:2] in [['pytaskqml', f] for f in features])\n"
        "print(loaded)\n"
        "pytaskqml.Stage\n"
        "print('pytaskqml.pipeline' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.split() == ["[]", "True"], done.stdout + done.stderr


@pytest.mark.parametrize(
    ("name", "home"),
    [
        ("RedisQueue", "pytaskqml.redis"),
        ("WorkerStats", "pytaskqml.core"),
        ("ProtocolError", "pytaskqml.errors"),
        ("PipelineStream", "pytaskqml.pipeline"),
        ("get_health", "pytaskqml.wire"),
    ],
)
def test_a_moved_name_still_works_with_a_deprecation_warning(name: str, home: str) -> None:
    module = __import__(home, fromlist=[name])
    with pytest.warns(DeprecationWarning, match=f"import it from {home}"):
        value = getattr(pytaskqml, name)
    assert value is getattr(module, name)


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        pytaskqml.Nope  # noqa: B018
