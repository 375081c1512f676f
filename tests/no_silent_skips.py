"""A pytest plugin: with CI=true, a skipped test fails the run, and the report names it.

A skipped test proved nothing. Outside CI, skips stay what pytest makes them (listed with their
reason, as `-ra` in pyproject.toml asks); in CI, where the real MNIST files are always present,
no test has a reason to skip.
"""

from __future__ import annotations

import os

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


class SkipsFailInCI:
    """Records the skipped tests of one session (one instance per pytest run)."""

    def __init__(self) -> None:
        self.skipped: list[str] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.skipped.append(f"{report.nodeid}: {reason}")

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if in_ci() and self.skipped and exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if in_ci() and self.skipped:
            terminalreporter.section("skipped tests fail the run when CI=true", red=True)
            for line in self.skipped:
                terminalreporter.line(line)


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(SkipsFailInCI(), "skips-fail-in-ci")
