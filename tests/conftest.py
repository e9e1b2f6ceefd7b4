"""Shared fixtures. Lab tests never skip: without root or Mininet they fail, saying why."""
from __future__ import annotations

import os
import shutil

import pytest


@pytest.fixture(scope="session")
def lab_host():
    """The machine can build Mininet labs; otherwise the lab test fails loudly (CI runs as root)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("not root")
    try:
        import mininet.net  # noqa: F401
    except ImportError:
        problems.append("mininet not importable")
    for tool in ("brctl", "iptables-restore", "mnexec"):
        if not shutil.which(tool):
            problems.append(f"{tool} missing")
    if problems:
        pytest.fail("lab tests need root and Mininet (run ./setup.sh, then tox as root): " + ", ".join(problems))
    return True


_SUMMARIES: list[str] = []


@pytest.fixture
def record_summary():
    """A test's table (e.g. fuzzing totals) for the end of the run, where CI logs show it."""
    return _SUMMARIES.append


def pytest_terminal_summary(terminalreporter):
    for text in _SUMMARIES:
        terminalreporter.write_sep("-", "summary")
        for line in text.splitlines():
            terminalreporter.write_line(line)
