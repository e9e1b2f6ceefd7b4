"""The lab <-> daemon control channel (emulator.jobs): codec round trips, and the daemon's side
over a StringTransport: each job line gets exactly one reply line; nothing unusable goes unanswered."""
from __future__ import annotations

import json
import socket

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from emulator import jobs
from emulator.protocols.base import ProbeResult, ProbeTarget

TARGET = ProbeTarget(id="7", host="198.18.1.10", transport="tcp", protocol="raw", port=9100, timeout=1.5,
                     options={"mode": "passive"})


def _server() -> tuple[jobs.JobServer, StringTransport]:
    server = jobs.JobServerFactory(Clock()).buildProtocol(None)
    transport = StringTransport()
    server.makeConnection(transport)
    return server, transport


def _replies(transport: StringTransport) -> list[jobs.Reply]:
    return [jobs.parse_reply(line) for line in transport.value().splitlines()]


def test_jobs_and_replies_survive_their_own_encoding():
    for job in (jobs.ProbeJob((TARGET,), 3), jobs.KnockJob((("198.18.1.10", "tcp", 22), ("198.18.1.11", "icmp", None)))):
        assert jobs.parse_job(job.to_line()) == job
    result = ProbeResult(id="7", outcome="ok", elapsed=0.25, exchange="RAW 1024 B")
    for reply in (jobs.ProbeReply((result,)), jobs.KnockReply(3, ("x: refused",)), jobs.JobError("no")):
        assert jobs.parse_reply(reply.to_line()) == reply


@pytest.mark.parametrize("line,why", [
    (b"not json", "not JSON"), (b"[1]", "JSON object"), (b"{}", "targets"),
    (b'{"targets": [{"id": 1}]}', "target 0"), (b'{"targets": [], "concurrency": 0}', "concurrency"),
    (b'{"targets": [], "concurrency": true}', "concurrency"), (b'{"knock": [["a", "sctp", 1]]}', "knock"),
    (b"[" * 5000, "")])
def test_unusable_jobs_get_one_error_line(line, why):
    server, transport = _server()
    server.dataReceived(line + b"\n")
    [reply] = _replies(transport)
    assert isinstance(reply, jobs.JobError) and why in reply.error and "\n" not in reply.error


def test_a_probe_job_without_targets_is_answered_at_once():
    server, transport = _server()
    server.dataReceived(jobs.ProbeJob(()).to_line())
    assert _replies(transport) == [jobs.ProbeReply(())]


def test_a_knock_job_sends_and_counts():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        server, transport = _server()
        server.dataReceived(jobs.KnockJob((("127.0.0.1", "udp", udp.getsockname()[1]),)).to_line())
        assert _replies(transport) == [jobs.KnockReply(1, ())]


def test_a_job_line_too_long_is_refused_and_the_connection_closed():
    server, transport = _server()
    server.MAX_LENGTH = 100
    server.dataReceived(b"x" * 200)
    assert _replies(transport) == [jobs.JobError("job too large")] and transport.disconnecting


def test_unusable_replies_become_errors_not_exceptions():
    for line in (b"", b"nope", b"[]", b'{"results": [{"id": 1}]}', b'{"knocked": "many"}', b'{"other": 1}'):
        assert isinstance(jobs.parse_reply(line), jobs.JobError)
    assert json.loads(jobs.JobError("a").to_line()) == {"error": "a"}
