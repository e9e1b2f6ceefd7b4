"""A running role daemon swaps the certificate of every TLS listener (emulator.jobs CertificateJob,
tls.swap_certificate): over loopback, HTTPS, implicit-TLS framed and STARTTLS terminal probes verify
OK, fail saying why once the certificate has expired or is the device's self-signed one, and work
again with a valid one from the lab CA; plus the job's codec and the words of a rejection."""
from __future__ import annotations

import datetime
import socket

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

import roles as role_data
from emulator import jobs, pki
from emulator.protocols import tls
from emulator.protocols.base import Persona, ProbeTarget
from tests.support import free_port, run_stub

MODEL = "KONICA MINOLTA bizhub C450i"


def _send(control, job) -> jobs.Reply:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(control))
        sock.sendall(job.to_line())
        return jobs.parse_reply(sock.makefile("rb").readline())


def _probe(control, targets) -> dict[str, tuple[str, str]]:
    reply = _send(control, jobs.ProbeJob(tuple(targets), len(targets)))
    assert isinstance(reply, jobs.ProbeReply), reply
    return {r.id: (r.outcome, r.detail) for r in reply.results}


def _outcomes(control, targets) -> dict[str, str]:
    return {target_id: outcome for target_id, (outcome, _detail) in _probe(control, targets).items()}


def test_a_running_daemon_swaps_the_certificate_of_every_tls_listener(tmp_path):
    ca = pki.LabCA()
    material = ca.write(tmp_path / "pki", [("ts", "127.0.0.1")])["ts"].to_dict()
    https, framed, terminal = free_port(), free_port(), free_port()
    listeners = [{"transport": "tcp", "port": https, "protocol": "http", "security": "tls"},
                 {"transport": "tcp", "port": framed, "protocol": "terminal-x", "security": "tls"},
                 {"transport": "tcp", "port": terminal, "protocol": "terminal", "security": "optional"}]
    verify = {"host": "127.0.0.1", "transport": "tcp", "server_name": "ts.lab", "ca_file": material["ca_file"],
              "timeout": 5.0}
    targets = [ProbeTarget(id="https", protocol="http", port=https, security="tls",
                           options=role_data.probe_options("terminal-server-22"), **verify),
               ProbeTarget(id="framed", protocol="safeq", port=framed, security="tls", size=4096, **verify),
               ProbeTarget(id="terminal", protocol="terminal", port=terminal, security="optional", size=1024,
                           **verify)]
    control = tmp_path / "ts.ctl"
    persona = {**material, "identity": role_data.identity(["terminal-server"])}
    with run_stub(tmp_path, listeners, persona=persona, host="ts", roles=("terminal-server",),
                  control=str(control)):
        assert _outcomes(control, targets) == {t.id: "ok" for t in targets}
        for kind, words in (("expired", "certificate has expired ('ts.lab' expired on "),
                            ("pre-installed", f"self-signed certificate {MODEL!r}, not issued by a CA the client trusts (ca.pem)")):
            cert_file, key_file = pki.write_certificate(ca, kind, tmp_path / "pki", "ts", "127.0.0.1", MODEL)
            reply = _send(control, jobs.CertificateJob(cert_file, key_file))
            assert isinstance(reply, jobs.CertificateReply) and reply.contexts >= 1, reply
            for target_id, (outcome, detail) in _probe(control, targets).items():
                assert outcome == "protocol_error" and detail.startswith("certificate: certificate verify failed: "), \
                    (kind, target_id, detail)
                assert words in detail, (kind, target_id, detail)
        valid = pki.write_certificate(ca, "valid", tmp_path / "pki", "ts", "127.0.0.1", MODEL)
        assert isinstance(_send(control, jobs.CertificateJob(*valid)), jobs.CertificateReply)
        assert _outcomes(control, targets) == {t.id: "ok" for t in targets}
        # a certificate with another certificate's key is refused, and the valid one stays
        refused = _send(control, jobs.CertificateJob(valid[0], material["key_file"]))
        assert isinstance(refused, jobs.JobError) and "not a usable certificate and key" in refused.error, refused
        assert _outcomes(control, targets) == {t.id: "ok" for t in targets}


def test_the_minted_certificates_have_the_one_defect_they_promise(tmp_path):
    ca = pki.LabCA()
    ca.write(tmp_path, [])
    now = datetime.datetime.now(datetime.timezone.utc)
    load = lambda kind: pki.x509.load_pem_x509_certificate(  # noqa: E731
        open(pki.write_certificate(ca, kind, tmp_path, "mfd-km", "198.18.2.10", MODEL)[0], "rb").read())
    expired, factory, valid = load("expired"), load("pre-installed"), load("valid")
    assert expired.not_valid_after_utc < now and pki.issued_by(expired, ca.cert)
    assert list(expired.extensions) == list(valid.extensions) and expired.subject == valid.subject
    assert valid.not_valid_before_utc < now < valid.not_valid_after_utc and pki.issued_by(valid, ca.cert)
    assert factory.issuer == factory.subject and pki.common_name(factory.subject) == MODEL
    assert not pki.issued_by(factory, ca.cert) and factory.not_valid_after_utc > now
    assert tls.rejection([valid], [ca.cert], "ca.pem") is None
    assert "certificate has expired" in tls.rejection([expired], [ca.cert], "ca.pem")
    assert "self-signed certificate" in tls.rejection([factory], [ca.cert], "ca.pem")
    other = pki.LabCA("ACME Issuing CA")
    assert "is issued by 'ACME Issuing CA', not by a CA the client trusts (ca.pem)" in \
        tls.rejection([other.issue("mfd-km", "198.18.2.10")[0]], [ca.cert], "ca.pem")
    assert "not yet valid" in tls.rejection([valid], [ca.cert], "ca.pem", now=now - datetime.timedelta(days=2))
    with pytest.raises(pki.LabError, match="unknown certificate kind 'stale'; use one of expired"):
        pki.write_certificate(ca, "stale", tmp_path, "mfd-km", "198.18.2.10", MODEL)


def _server(persona: Persona | None = None) -> tuple[jobs.JobServer, StringTransport]:
    server = jobs.JobServerFactory(Clock(), persona).buildProtocol(None)
    transport = StringTransport()
    server.makeConnection(transport)
    return server, transport


def test_the_certificate_job_codec():
    job = jobs.CertificateJob("/run/pki/mfd-km.expired.pem", "/run/pki/mfd-km.expired.key")
    assert jobs.parse_job(job.to_line()) == job
    assert jobs.parse_reply(jobs.CertificateReply(2).to_line()) == jobs.CertificateReply(2)
    for line in (b'{"certificate": "x.pem"}', b'{"certificate": {"cert_file": "x.pem"}}',
                 b'{"certificate": {"cert_file": "x.pem", "key_file": 7}}'):
        server, transport = _server()
        server.dataReceived(line + b"\n")
        [reply] = [jobs.parse_reply(x) for x in transport.value().splitlines()]
        assert isinstance(reply, jobs.JobError) and "certificate must be {cert_file" in reply.error, reply
    # a daemon without a certificate, or given files that do not exist: one error line each
    for persona, why in ((None, "serves no certificate"),
                         (Persona(host="ts", roles=("stub",), cert_file="/nonexistent/ts.pem",
                                  key_file="/nonexistent/ts.key"), "not a usable certificate and key")):
        server, transport = _server(persona)
        server.dataReceived(job.to_line())
        [reply] = [jobs.parse_reply(x) for x in transport.value().splitlines()]
        assert isinstance(reply, jobs.JobError) and why in reply.error, reply
