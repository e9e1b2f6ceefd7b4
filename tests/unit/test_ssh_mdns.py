"""SSH (twisted.conch) and mDNS (twisted.names) stubs against their own probes on loopback, plus
their codecs in memory: the fixed command table, host key publication, mDNS answers."""
from __future__ import annotations

import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings, strategies as st
from twisted.internet.defer import maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import LogLevel, globalLogPublisher
from twisted.names import dns

from emulator import pki
from emulator.protocols import mdns, module_for, ssh
from emulator.protocols.base import Listener, Persona, ProbeTarget
from tests.support import free_port, run_on_fresh_reactor


@pytest.fixture
def material(tmp_path):
    return pki.make_test_pki(tmp_path / 'pki', host='stub.lab', address='127.0.0.1')


@pytest.fixture
def failures():
    """Events a daemon would log as failures (tracebacks) or errors while the test runs."""
    seen: list[dict] = []

    def observe(event):
        if 'log_failure' in event or event.get('log_level') in (LogLevel.error, LogLevel.critical):
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


def persona_of(material: dict | None = None, **identity) -> Persona:
    return Persona(host='stub', roles=('ua',), address='127.0.0.1', identity=identity, **(material or {}))


def target_of(port: int, protocol: str, transport: str, material: dict | None = None,
              server_name: str = 'stub.lab', security: str = 'plain', **options) -> ProbeTarget:
    return ProbeTarget(id='t', host='127.0.0.1', transport=transport, protocol=protocol, port=port,
                       security=security, timeout=5.0, server_name=server_name,
                       ca_file=(material or {}).get('ca_file', ''), options=options)


def serve_and_probe(module, listener: Listener, persona: Persona, targets, before_probe=None,
                    between=None):
    """Listen, probe each target built by ``targets(port)`` in turn, stop; (results, records).
    ``between(port)`` runs after the first probe, in a thread: it may block on the stub."""
    records: list[dict] = []

    def run(reactor):
        port = module.listen(reactor, listener, persona, records.append, interface='127.0.0.1')
        number = port.getHost().port
        if before_probe is not None:
            before_probe(number)
        results = []
        pending = list(targets(number))

        def next_probe(_=None):
            if not pending:
                return port.stopListening()
            d = module.probe(reactor, pending.pop(0))
            d.addCallback(results.append)
            if between is not None and not results:
                d.addCallback(lambda _: deferToThreadPool(reactor, reactor.getThreadPool(), between, number))
            return d.addCallback(next_probe)

        return maybeDeferred(next_probe).addCallback(lambda _: results)

    return run_on_fresh_reactor(run, limit=20), records


# --- SSH: the command table --------------------------------------------------------------------

@pytest.mark.parametrize('command, stdout, status', [
    (b'hostname', b'stub\n', 0),
    (b'hostname -f', b'stub.lab\n', 0),
    (b'uname -n', b'stub\n', 0),
    (b'whoami', b'alice\n', 0),
    (b"echo 'a  b' c", b'a  b c\n', 0),
    (b'echo $HOME', b'$HOME\n', 0),          # nothing is expanded
    (b'false', b'', 1),
])
def test_fixed_commands_answer_from_the_table(command, stdout, status):
    out, err, code = ssh.run_command(command, 'stub', 'alice')
    assert (out, err, code) == (stdout, b'', status)


@pytest.mark.parametrize('command', [b'rm -rf /', b'hostname; id', b'ls', b'sh -c hostname', b"echo 'unclosed",
                                     b'\xff\xfe'])
def test_anything_else_is_not_found_with_status_127(command):
    out, err, code = ssh.run_command(command, 'stub', 'alice')
    if command == b"echo 'unclosed":   # a shell would fail to parse it; the table just echoes the words
        assert code == 0
        return
    assert (out, code) == (b'', 127) and err.endswith(b': not found\n')


# --- SSH: stub against probe -------------------------------------------------------------------

@pytest.mark.parametrize('security', ['tls', 'plain'])
def test_probe_logs_in_with_the_lab_key_and_reads_the_host_name(material, security, failures):
    listener = Listener(transport='tcp', port=0, protocol='ssh', security=security)
    (result,), records = serve_and_probe(ssh, listener, persona_of(material),
                                         lambda port: [target_of(port, 'ssh', 'tcp', material, security=security)])
    assert result.outcome == 'ok', result.detail
    assert 'verified' in result.exchange and 'auth publickey as safeq' in result.exchange
    assert result.tls_issuer == ''   # SSH, never TLS
    ops = [(r['op'], r.get('method'), r.get('accepted'), r.get('command'), r.get('exit_status')) for r in records]
    assert ops == [('hello', None, None, None, None), ('auth', 'publickey', True, None, None),
                   ('exec', None, None, 'hostname', 0)]
    assert all(r['peer'] == '127.0.0.1' and r['transport'] == 'tcp' for r in records)
    assert failures == []


def test_published_host_key_is_derived_from_the_host_tls_key(material):
    first = ssh.host_key(persona_of(material))
    derived = pki.ssh_host_key(material['key_file'])
    assert pki.ssh_public_line(first) == pki.ssh_public_line(derived)
    serve_and_probe(ssh, Listener(transport='tcp', port=0, protocol='ssh'), persona_of(material), lambda p: [])
    published = pki.ssh_host_key_file(Path(material['ca_file']).parent, 'stub').read_bytes()
    assert published.split()[:2] == pki.ssh_public_line(derived).split()


def test_lab_client_key_is_made_once_private_and_kept(tmp_path):
    first = pki.ssh_client_key(tmp_path)
    again = pki.ssh_client_key(tmp_path)
    key_file = tmp_path / pki.SSH_CLIENT_KEY_FILE
    assert pki.ssh_public_line(first) == pki.ssh_public_line(again)
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert key_file.read_bytes().startswith(b'-----BEGIN OPENSSH PRIVATE KEY-----')
    assert (tmp_path / 'ssh_client_key.pub').read_bytes().split()[:2] == pki.ssh_public_line(first).split()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith('.tmp')] == []


def test_password_login_works_and_a_wrong_password_is_refused(material):
    listener = Listener(transport='tcp', port=0, protocol='ssh', security='tls')
    results, records = serve_and_probe(ssh, listener, persona_of(material), lambda port: [
        target_of(port, 'ssh', 'tcp', material, auth='password'),
        target_of(port, 'ssh', 'tcp', material, auth='password', password='wrong')])
    good, bad = results
    assert good.outcome == 'ok' and 'auth password' in good.exchange
    assert bad.outcome == 'protocol_error' and 'authenticating' in bad.detail
    auths = [(r['method'], r['accepted']) for r in records if r['op'] == 'auth']
    assert auths == [('password', True), ('password', False)]


def test_without_lab_material_the_host_key_is_accepted_and_recorded():
    listener = Listener(transport='tcp', port=0, protocol='ssh', security='tls')
    (result,), _ = serve_and_probe(ssh, listener, persona_of(),
                                   lambda port: [target_of(port, 'ssh', 'tcp', None)])
    assert result.outcome == 'ok', result.detail
    assert 'accepted and recorded' in result.exchange and 'SHA256:' in result.exchange
    assert 'auth password' in result.exchange   # no lab client key without the lab directory


def test_a_host_key_other_than_the_published_one_is_a_protocol_error(material):
    listener = Listener(transport='tcp', port=0, protocol='ssh', security='tls')
    directory = Path(material['ca_file']).parent

    def impostor(_port):
        pki.publish_ssh_host_key(directory, 'stub', Ed25519PrivateKey.generate())

    (result,), records = serve_and_probe(ssh, listener, persona_of(material),
                                         lambda port: [target_of(port, 'ssh', 'tcp', material)],
                                         before_probe=impostor)
    assert result.outcome == 'protocol_error' and 'not the published key' in result.detail
    assert not [r for r in records if r['op'] == 'auth']


def test_missing_published_key_is_a_lab_error_and_another_host_name_is_caught(material):
    listener = Listener(transport='tcp', port=0, protocol='ssh', security='tls')
    directory = Path(material['ca_file']).parent

    def alias(_port):   # the right key published under another host's name: only the name differs
        pki.ssh_host_key_file(directory, 'other').write_bytes(pki.ssh_host_key_file(directory, 'stub').read_bytes())

    (missing, renamed), _ = serve_and_probe(ssh, listener, persona_of(material), lambda port: [
        target_of(port, 'ssh', 'tcp', material, server_name='nowhere.lab'),
        target_of(port, 'ssh', 'tcp', material, server_name='other.lab')], before_probe=alias)
    assert missing.outcome == 'error' and 'no published SSH host key' in missing.detail
    assert renamed.outcome == 'protocol_error' and "says it is 'stub'" in renamed.detail


def test_garbage_is_answered_with_a_disconnect_and_the_stub_keeps_serving(material, failures):
    listener = Listener(transport='tcp', port=0, protocol='ssh', security='tls')
    answers: list[bytes] = []

    def hostile(port):
        for data in (b'SSH-2.0-fuzz\r\n' + b'\x00\x00\x00\x0c\x0a\x15' + b'\xff' * 10,   # KEXINIT, truncated
                     b'SSH-2.0-fuzz\r\n' + b'\xff' * 64,                                # absurd packet length
                     b'x' * 5000,                                                       # no version line
                     b'SSH-1.5-old\r\n'):
            with socket.create_connection(('127.0.0.1', port), timeout=5) as s:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                chunks = []
                while chunk := s.recv(65536):
                    chunks.append(chunk)
                answers.append(b''.join(chunks))

    results, records = serve_and_probe(ssh, listener, persona_of(material), lambda port: [
        target_of(port, 'ssh', 'tcp', material), target_of(port, 'ssh', 'tcp', material)], between=hostile)
    assert [r.outcome for r in results] == ['ok', 'ok']
    assert len(answers) == 4 and all(a.startswith(b'SSH-2.0-') for a in answers)   # answered, then closed
    assert any(r['op'] == 'error' for r in records)
    assert failures == []


def test_persona_banner_is_sent_and_a_bad_one_is_rejected(material):
    listener = Listener(transport='tcp', port=0, protocol='ssh', security='tls')
    persona = persona_of(material, ssh_banner='SSH-2.0-OpenSSH_9.2p1 Debian-2')
    (result,), _ = serve_and_probe(ssh, listener, persona, lambda port: [target_of(port, 'ssh', 'tcp', material)])
    assert result.outcome == 'ok' and 'server SSH-2.0-OpenSSH_9.2p1 Debian-2 ' in result.exchange
    for bad in ('OpenSSH_9.2', 'SSH-2.0-a\r\nSSH-2.0-b', 'SSH-2.0-é'):
        with pytest.raises(ValueError, match='ssh_banner'):
            ssh.banner_of(persona_of(ssh_banner=bad))


def test_ssh_probe_of_a_closed_port_is_refused():
    target = target_of(free_port(), 'ssh', 'tcp')
    result = run_on_fresh_reactor(lambda reactor: ssh.probe(reactor, target))
    assert result.outcome == 'refused'


@pytest.mark.parametrize('transport, security', [('udp', 'plain'), ('tcp', 'starttls'), ('tcp', 'optional')])
def test_ssh_listen_rejects_what_ssh_is_not(transport, security):
    with pytest.raises(ValueError):
        ssh.listen(None, Listener(transport=transport, port=0, protocol='ssh', security=security), persona_of())


# --- mDNS: codec -----------------------------------------------------------------------------------

def query(name: bytes, qtype: int, query_id: int = 4242, qclass: int = dns.IN) -> bytes:
    message = dns.Message(id=query_id)
    message.queries = [dns.Query(name, qtype, qclass)]
    return message.toStr()


def decoded(datagram: bytes) -> dns.Message:
    message = dns.Message()
    message.fromStr(datagram)
    return message


PRINTER = persona_of(make_model='Xerox AltaLink C8145', ipp_port=8631)


def test_legacy_unicast_ptr_query_gets_ptr_srv_txt_and_a():
    zone = mdns.build_zone(PRINTER, '198.18.0.23')
    reply, fields = mdns.answer(zone, query(b'_ipp._tcp.local', dns.PTR), legacy=True)
    message = decoded(reply)
    instance = b'Xerox AltaLink C8145 [stub]._ipp._tcp.local'
    assert message.id == 4242 and message.answer and message.auth
    assert [q.name.name for q in message.queries] == [b'_ipp._tcp.local']
    assert [(r.name.name, r.payload.name.name) for r in message.answers] == [(b'_ipp._tcp.local', instance)]
    extra = {r.type: r for r in message.additional}
    assert (extra[dns.SRV].payload.port, extra[dns.SRV].payload.target.name) == (8631, b'stub.local')
    assert b'ty=Xerox AltaLink C8145' in extra[dns.TXT].payload.data and b'rp=ipp/print' in extra[dns.TXT].payload.data
    assert extra[dns.A].payload.dottedQuad() == '198.18.0.23'
    assert all(r.ttl <= mdns.LEGACY_TTL and r.cls == dns.IN for r in message.answers + message.additional)
    assert fields == {'op': 'query', 'legacy_unicast': True, 'answers': 1, 'questions': ['_ipp._tcp.local PTR']}


def test_mdns_port_query_gets_an_mdns_response_with_cache_flush_on_unique_records():
    zone = mdns.build_zone(PRINTER, '198.18.0.23')
    reply, _ = mdns.answer(zone, query(b'STUB.local', dns.A, qclass=dns.IN | mdns.UNICAST_RESPONSE),
                           legacy=False)
    message = decoded(reply)
    assert message.id == 0 and message.queries == []
    (record,) = message.answers
    assert record.cls == dns.IN | mdns.CACHE_FLUSH and record.ttl == mdns.HOST_TTL
    assert record.name.name == b'stub.local'


def test_services_meta_query_lists_the_printer_types_and_srv_needs_a_known_port():
    zone = mdns.build_zone(persona_of(make_model='M'), '198.18.0.23')
    reply, _ = mdns.answer(zone, query(mdns.SERVICE_TYPES, dns.PTR), legacy=True)
    assert sorted(r.payload.name.name for r in decoded(reply).answers) == sorted(mdns.SERVICES)
    reply, _ = mdns.answer(zone, query(b'M [stub]._printer._tcp.local', dns.ALL_RECORDS), legacy=True)
    assert [r.type for r in decoded(reply).answers] == [dns.TXT]   # no lpd_port in the identity: no SRV
    reply, _ = mdns.answer(zone, query(b'_printer._tcp.local', dns.PTR), legacy=True)
    extra = decoded(reply).additional   # still the instance's TXT and the host's address
    assert sorted(r.type for r in extra) == sorted([dns.TXT, dns.A]) and b'rp=lp' in extra[0].payload.data


def test_unknown_names_responses_and_garbage_get_no_reply():
    zone = mdns.build_zone(PRINTER, '198.18.0.23')
    assert mdns.answer(zone, query(b'_http._tcp.local', dns.PTR), legacy=True) == (None, {
        'op': 'query', 'legacy_unicast': True, 'answers': 0, 'questions': ['_http._tcp.local PTR']})
    response = dns.Message(answer=1)
    response.queries = [dns.Query(b'_ipp._tcp.local', dns.PTR)]
    assert mdns.answer(zone, response.toStr(), legacy=True)[1]['reason'] == 'a response, not a query'
    reply, fields = mdns.answer(zone, b'\x00\x01\x00', legacy=True)
    assert reply is None and fields['op'] == 'ignored'


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_mdns_answer_never_raises(data):
    reply, fields = mdns.answer(mdns.build_zone(PRINTER, '198.18.0.23'), data, legacy=True)
    assert fields['op'] in ('query', 'ignored') and (reply is None or len(reply) <= mdns.MAX_MESSAGE)


def test_instance_label_is_one_bounded_label():
    label = mdns.instance_label(persona_of(make_model='Vendor X.Y ' + 'é' * 60))
    assert b'.' not in label and len(label) <= 63
    label.decode('utf-8')


# --- mDNS: stub against probe -----------------------------------------------------------------------

def test_mdns_probe_finds_the_instance_and_the_target_address(failures):
    listener = Listener(transport='udp', port=0, protocol='mdns')
    hostile = [b'', b'\xff' * 40, query(b'_ipp._tcp.local', dns.PTR)[:15], struct.pack('!H', 1) * 300]

    def garbage(port):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for data in hostile:
                s.sendto(data, ('127.0.0.1', port))

    results, records = serve_and_probe(mdns, listener, PRINTER, lambda port: [
        target_of(port, 'mdns', 'udp'), target_of(port, 'mdns', 'udp')], between=garbage)
    assert [r.outcome for r in results] == ['ok', 'ok'], results
    assert 'Xerox AltaLink C8145 [stub]._ipp._tcp.local' in results[0].exchange
    assert records[0]['op'] == 'query' and records[0]['legacy_unicast'] and records[0]['peer'] == '127.0.0.1'
    # every datagram is witnessed; the empty one and the one with QR set are ignored outright,
    # twisted.names reads the truncated ones as queries without (complete) questions
    assert len(records) == 2 + len(hostile) and sum(r['op'] == 'ignored' for r in records) >= 2
    assert failures == []


@pytest.mark.parametrize('address, server_name, wanted', [
    ('198.18.0.99', 'stub.lab', 'no A record stub.local=127.0.0.1'),   # advertises another address
    ('127.0.0.1', 'other.lab', 'no A record other.local=127.0.0.1'),  # another host answered
])
def test_mdns_probe_checks_address_and_name(address, server_name, wanted):
    persona = Persona(host='stub', roles=('mfd',), address=address, identity={'make_model': 'M'})
    (result,), _ = serve_and_probe(mdns, Listener(transport='udp', port=0, protocol='mdns'), persona,
                                   lambda port: [target_of(port, 'mdns', 'udp', server_name=server_name)])
    assert result.outcome == 'protocol_error' and wanted in result.detail


def test_mdns_probe_of_a_closed_port_is_refused():
    target = target_of(free_port(socket.SOCK_DGRAM), 'mdns', 'udp')
    result = run_on_fresh_reactor(lambda reactor: mdns.probe(reactor, target))
    assert result.outcome == 'refused'


def test_mdns_listen_is_udp_and_plain_only():
    with pytest.raises(ValueError):
        mdns.listen(None, Listener(transport='tcp', port=0, protocol='mdns'), PRINTER)
    with pytest.raises(ValueError):
        mdns.listen(None, Listener(transport='udp', port=0, protocol='mdns', security='tls'), PRINTER)


def test_both_protocols_are_served_by_their_modules():
    assert module_for('ssh') is ssh and module_for('mdns') is mdns


def test_importing_the_modules_leaves_the_global_reactor_alone():
    # roled imports every protocol module before it installs its reactor; Conch's factory and
    # userauth modules import the global one, so ssh must load them on first use only.
    code = ('import sys, emulator.protocols.ssh, emulator.protocols.mdns; '
            'assert "twisted.internet.reactor" not in sys.modules, "reactor installed"; print("clean")')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == 'clean', out.stderr


def test_a_channel_lost_while_opening_settles_the_probe():
    """Conch hands openFailed a bare ConnectionLost when the connection drops first (seen in a loaded lab)."""
    from twisted.internet import error

    decided = []

    class Probe:
        def decide(self, outcome, detail=''):
            decided.append((outcome, detail))

    session = ssh._ProbeCommand.__new__(ssh._ProbeCommand)
    session.probe = Probe()
    session.openFailed(error.ConnectionLost())
    assert decided and decided[0][0] == 'protocol_error' and 'Connection to the other side was lost' in decided[0][1]
