"""CPython's own concurrent.futures tests against pytaskqml.Executor (see cpython_futures.py):
one test here per test of the suite, which fails when the outcome is not the one the table
of known failures gives; and the docs' copy of that table."""

from __future__ import annotations

from pathlib import Path

import cpython_futures as cf
import pytest

SUITE = cf.find_suite()
IDS = cf.test_ids(SUITE) if SUITE is not None else []
NO_SUITE = (
    "no CPython test_concurrent_futures installed (Debian: apt-get install libpython3.11-testsuite)"
)


@pytest.mark.slow
@pytest.mark.skipif(SUITE is None, reason=NO_SUITE)
@pytest.mark.parametrize("test", IDS or ["none"])
def test_cpython_concurrent_futures(test: str) -> None:
    assert SUITE is not None
    outcome = cf.run_one(SUITE, test)
    problem = cf.verdict(outcome)
    assert problem is None, problem
    if outcome.status == "skipped":
        pytest.skip(outcome.detail)
    known = cf.KNOWN.get(test)
    if known is not None and outcome.status == "failed":
        pytest.xfail(known[1])


def test_the_known_failures_are_documented() -> None:
    text = cf.DOC.read_text(encoding="utf-8") if cf.DOC.exists() else ""
    assert text == cf.docs_table(), (
        f"{cf.DOC} is out of date: run `python tests/cpython_futures.py --write-docs`"
    )


@pytest.mark.skipif(SUITE is None, reason=NO_SUITE)
def test_the_table_names_only_tests_the_suite_has() -> None:
    missing = sorted(set(cf.KNOWN) - set(IDS))
    assert not missing, f"KNOWN lists tests the suite does not have: {missing}"


def test_a_suite_is_found_by_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    newer = tmp_path / "lib" / "python3.99" / "test" / "test_concurrent_futures"
    newer.mkdir(parents=True)
    (newer / "__init__.py").write_text("")
    monkeypatch.setenv("PYTASKQML_CPYTHON_FUTURES", str(newer))
    suite = cf.find_suite()
    assert suite is not None and suite.version == (3, 99) and suite.is_package
