"""The CI rule of tests/no_silent_skips.py, on a throwaway test file run by pytest itself."""

from __future__ import annotations

import pytest

from tests.conftest import REPO_ROOT

pytest_plugins = ["pytester"]

ONE_PASS_ONE_SKIP = """
import pytest

def test_passes():
    pass

def test_needs_something():
    pytest.skip("the something is absent")
"""


@pytest.fixture
def run_with_plugin(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
    pytester.makepyfile(test_sample=ONE_PASS_ONE_SKIP)
    # -ra as pyproject.toml sets it for the project's own runs
    return lambda: pytester.runpytest_subprocess("-ra", "-p", "tests.no_silent_skips", "-p", "no:cacheprovider")


def test_a_skip_fails_the_run_in_ci_and_is_named(run_with_plugin, monkeypatch):
    monkeypatch.setenv("CI", "true")
    result = run_with_plugin()
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*skipped tests fail the run when CI=true*",
                                 "test_sample.py::test_needs_something: *the something is absent"])


def test_outside_ci_a_skip_is_listed_with_its_reason(run_with_plugin, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    result = run_with_plugin()
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["SKIPPED * the something is absent"])
