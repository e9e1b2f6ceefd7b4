"""Fixtures shared by the unit tests."""
from __future__ import annotations

import pytest

from tests.support import tls_clocked_reactor


@pytest.fixture
def fresh_reactor(monkeypatch):
    """A new epoll reactor per test, also used by Twisted's TLS layer for its timers."""
    return tls_clocked_reactor(monkeypatch)
