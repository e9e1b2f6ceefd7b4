"""ldap: codec, directory, server stub (bind, search, StartTLS, malformed BER) and probe.

Server and probe logic run in memory over StringTransport with a
MemoryReactorClock; full exchanges (plain, LDAPS, StartTLS) run on loopback
127.0.0.1, each on a fresh (non-global) reactor; one test goes through the
real daemon and prober processes.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest
from twisted.protocols.tls import TLSMemoryBIOFactory
from ldaptor.protocols import pureldap
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import deferLater
from twisted.internet.testing import (MemoryReactorClock, StringTransport,
                                      StringTransportWithDisconnection)
from twisted.python.failure import Failure
from zope.interface import alsoProvides

from emulator import protocols
from emulator.pki import make_test_pki
from emulator.protocols import ldap, tls
from emulator.protocols.base import Listener, Persona, ProbeResult, ProbeTarget
from tests.support import fired, free_port, request_log, run_on_reactor, run_stub, tls_clocked_reactor

SERVER = IPv4Address('TCP', '198.18.0.2', 10389)
CLIENT = IPv4Address('TCP', '198.18.0.9', 40001)
ALICE = 'uid=alice,ou=people,dc=safeq,dc=lab'
NOTICE = ldap.NOTICE_OF_DISCONNECTION_OID


@pytest.fixture(scope='module')
def pki(tmp_path_factory):
    return make_test_pki(tmp_path_factory.mktemp('pki'))


@pytest.fixture(scope='module')
def other_pki(tmp_path_factory):
    """A second, unrelated CA: its bundle must not validate the stub's certificate."""
    return make_test_pki(tmp_path_factory.mktemp('other-pki'))


def persona(pki: dict | None = None) -> Persona:
    return Persona(host='terminal-server', roles=('terminal-server',), address='127.0.0.1',
                   identity={'vendor': 'YSoft'}, **(pki or {}))


def decode_all(data: bytes) -> list[pureldap.LDAPMessage]:
    messages = []
    while data:
        decoded = ldap.decode_message(data)
        assert decoded is not None, f'truncated LDAP data: {data!r}'
        messages.append(decoded[0])
        data = data[decoded[1]:]
    return messages


# --- codec --------------------------------------------------------------------------

def test_codec_round_trip_and_partial_input():
    wire = ldap.encode_message(pureldap.LDAPBindRequest(dn=ALICE, auth='pw'), 7)
    for cut in range(len(wire)):
        assert ldap.decode_message(wire[:cut]) is None
    message, used = ldap.decode_message(wire + b'\x30')
    assert used == len(wire) and message.id == 7
    assert isinstance(message.value, pureldap.LDAPBindRequest) and message.value.dn == ALICE.encode()


@pytest.mark.parametrize('data, reason', [
    (b'GET / HTTP/1.1\r\n\r\n', 'tag 0x47'),
    (b'\x30\x80\x02\x01\x01', 'indefinite'),
    (b'\x30\x85\x01\x00\x00\x00\x00', 'length field of 5 bytes'),
    (b'\x30\x84\x7f\xff\xff\xff', 'exceeds'),
    (b'\x30\x03\x02\x01\x01', 'undecodable'),
    (b'\x30\x06\x02\x01\x01\x7f\x01\x00', 'undecodable'),  # unknown protocol op
])
def test_codec_rejects_malformed_messages(data, reason, capsys):
    with pytest.raises(ldap.LDAPWireError, match=reason):
        ldap.decode_message(data)
    assert capsys.readouterr().out == ''  # ldaptor's prints stay off the daemon's stdout


def test_result_names_and_filter_text():
    assert ldap.result_name(49) == 'invalidCredentials' and ldap.result_name(0) == 'success'
    assert ldap.result_name(4242) == 'resultCode 4242'
    wire = ldap.encode_message(pureldap.LDAPSearchRequest(filter=pureldap.LDAPFilter_and([
        ldap._equality('objectClass', 'groupOfNames'),
        pureldap.LDAPFilter_not(pureldap.LDAPFilter_present('mail')),
        pureldap.LDAPFilter_substrings(type='cn', substrings=[
            pureldap.LDAPFilter_substrings_initial('pr'), pureldap.LDAPFilter_substrings_any('nt'),
            pureldap.LDAPFilter_substrings_final('rs')])])), 1)
    search_filter = ldap.decode_message(wire)[0].value.filter
    assert ldap.filter_text(search_filter) == '(&(objectClass=groupOfNames)(!(mail=*))(cn=pr*nt*rs))'


# --- directory ----------------------------------------------------------------------

def test_lab_directory_has_users_and_groups():
    root = ldap.load_directory()
    assert root.dn.getText() == ldap.BASE_DN
    alice = fired(root.lookup(ALICE))
    assert fired(alice.bind(ldap.LAB_PASSWORD)) is alice
    for group in ldap.LAB_GROUPS:
        entry = fired(root.lookup(f'cn={group},{ldap.GROUPS_DN}'))
        assert ALICE in {ldap._text(v) for v in entry['member']}
    replicator = fired(root.lookup(ldap.REPLICATOR_DN))
    assert fired(replicator.bind(ldap.REPLICATOR_PASSWORD)) is replicator


def test_bad_ldif_is_reported(tmp_path):
    bad = tmp_path / 'bad.ldif'
    bad.write_text('dn: dc=x\nobjectClass top\n\n')
    with pytest.raises(ValueError, match='bad.ldif'):
        ldap.load_directory(str(bad))


def test_importing_the_module_leaves_the_global_reactor_alone():
    # roled imports protocol modules while parsing its spec, before it installs
    # the asyncio reactor; ldaptor's client would install the default one.
    code = ('import sys, emulator.protocols.ldap as m; '
            'assert "twisted.internet.reactor" not in sys.modules, "reactor installed"; '
            'm.probe; print("clean")')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == 'clean', out.stderr


# --- server stub, in memory ---------------------------------------------------------------

class TLSStringTransport(StringTransport):
    """StringTransport that records startTLS and then looks like a TLS transport."""

    tls_options = None
    cleartext = b''

    def startTLS(self, options):
        self.tls_options = options
        self.cleartext = self.value()  # what went out before the handshake
        self.clear()
        alsoProvides(self, ISSLTransport)


class Stub:
    def __init__(self, security: str = 'plain', pki: dict | None = None, tls_transport=False):
        self.reactor = MemoryReactorClock()
        self.records: list[dict] = []
        self.persona = persona(pki)
        ldap.listen(self.reactor, Listener('tcp', SERVER.port, 'ldap', security), self.persona,
                    on_request=self.records.append)
        self.factory = self.reactor.tcpServers[-1][1]
        if security == 'tls':  # implicit TLS wraps our factory in Twisted's TLS factory
            self.factory = self.factory.wrappedFactory
        self.proto = self.factory.buildProtocol(CLIENT)
        self.transport = TLSStringTransport(hostAddress=SERVER, peerAddress=CLIENT)
        if tls_transport:
            alsoProvides(self.transport, ISSLTransport)
        self.proto.makeConnection(self.transport)
        self.next_id = 0

    def send(self, op) -> list:
        """Responses (values) to one request."""
        self.next_id += 1
        self.transport.cleartext = b''
        self.proto.dataReceived(ldap.encode_message(op, self.next_id))
        # After a StartTLS the answer is what went out before the handshake.
        messages = decode_all(self.transport.cleartext + self.transport.value())
        self.transport.clear()
        assert all(m.id == self.next_id for m in messages), messages
        return [m.value for m in messages]

    def bind(self, dn=ALICE, password=ldap.LAB_PASSWORD):
        [response] = self.send(pureldap.LDAPBindRequest(dn=dn, auth=password))
        return response

    def search(self, base=ldap.GROUPS_DN, search_filter=None, attributes=()):
        return self.send(pureldap.LDAPSearchRequest(
            baseObject=base, filter=search_filter or ldap._equality('member', ALICE),
            attributes=list(attributes)))


def attrs(entry) -> dict:
    return {ldap._text(k).lower(): sorted(ldap._text(v) for v in values) for k, values in entry.attributes}


def test_bind_says_who_answered_and_whom_it_saw():
    stub = Stub()
    response = stub.bind()
    assert isinstance(response, pureldap.LDAPBindResponse) and response.resultCode == 0
    assert ldap._text(response.errorMessage) == (
        f'safeq-lab terminal-server (terminal-server): bound {ALICE}; peer={CLIENT.host}')
    assert ldap._text(response.matchedDN) == ''
    assert stub.records == [{'transport': 'tcp', 'port': SERVER.port, 'peer': CLIENT.host, 'op': 'bind',
                             'tls': False, 'dn': ALICE, 'result': 'success'}]


@pytest.mark.parametrize('dn, password, code, result', [
    (ALICE, 'wrong', 49, 'invalidCredentials'),
    (ALICE, '', 49, 'invalidCredentials'),
    ('uid=nobody,ou=people,dc=safeq,dc=lab', 'x', 49, 'invalidCredentials'),
    ('uid=alice,dc=example,dc=com', 'x', 49, 'invalidCredentials'),
    ('not a dn', 'x', 34, 'invalidDNSyntax'),
])
def test_bind_refusals(dn, password, code, result):
    stub = Stub()
    response = stub.bind(dn, password)
    assert (type(response), response.resultCode) == (pureldap.LDAPBindResponse, code)
    assert [(r['op'], r['dn'], r['result']) for r in stub.records] == [('bind', dn, result)]


def test_failed_rebind_leaves_the_connection_anonymous():
    stub = Stub()
    stub.bind()
    assert stub.bind(ALICE, 'wrong').resultCode == 49
    assert stub.search()[-1].resultCode == 1  # no longer bound


def test_sasl_bind_is_not_supported():
    stub = Stub()
    [response] = stub.send(pureldap.LDAPBindRequest(dn='', auth=(b'PLAIN', b'x'), sasl=True))
    assert response.resultCode == 7  # authMethodNotSupported


def test_search_needs_a_bind():
    stub = Stub()
    [done] = stub.search()
    assert isinstance(done, pureldap.LDAPSearchResultDone) and done.resultCode == 1
    assert stub.records[-1]['result'] == 'operationsError'


def test_search_returns_the_users_groups():
    stub = Stub()
    stub.bind()
    *entries, done = stub.search(attributes=['cn'])
    assert done.resultCode == 0
    assert sorted(attrs(e)['cn'][0] for e in entries) == ['print-users', 'scan-users']
    assert stub.records[-1] == {'transport': 'tcp', 'port': SERVER.port, 'peer': CLIENT.host,
                                'op': 'search', 'tls': False, 'dn': ldap.GROUPS_DN,
                                'filter': f'(member={ALICE})', 'result': 'success', 'entries': 2}


@pytest.mark.parametrize('attributes', [(), ('*',), ('userPassword', 'uid')])
def test_search_never_returns_passwords(attributes):
    stub = Stub()
    stub.bind()
    *entries, done = stub.search(ldap.BASE_DN, pureldap.LDAPFilter_present('uid'), attributes)
    assert done.resultCode == 0 and len(entries) == 4  # three people, one service account
    assert all('userpassword' not in attrs(e) for e in entries)
    assert all('uid' in attrs(e) for e in entries)


@pytest.mark.parametrize('search_filter, code', [
    (pureldap.LDAPFilter_approxMatch(attributeDesc=pureldap.LDAPAttributeDescription('uid'),
                                     assertionValue=pureldap.LDAPAssertionValue('alice')), 53),
    (pureldap.LDAPFilter_extensibleMatch(matchingRule=None, type=None, matchValue='x', dnAttributes=False), 53),
    (pureldap.LDAPFilter_substrings(type='uid', substrings=[]), 2),
    (pureldap.LDAPFilter_substrings(type='uid', substrings=[pureldap.LDAPFilter_substrings_final('e'),
                                                            pureldap.LDAPFilter_substrings_initial('a')]), 2),
    (pureldap.LDAPFilter_and([pureldap.LDAPFilter_present('uid'),
                              pureldap.LDAPFilter_not(pureldap.LDAPFilter_approxMatch(
                                  attributeDesc=pureldap.LDAPAttributeDescription('cn'),
                                  assertionValue=pureldap.LDAPAssertionValue('x')))]), 53),
])
def test_filters_ldaptor_cannot_evaluate_get_a_result_code_not_a_traceback(search_filter, code):
    from twisted.logger import globalLogPublisher
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        stub = Stub()
        stub.bind()
        [done] = stub.search(ldap.BASE_DN, search_filter)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert isinstance(done, pureldap.LDAPSearchResultDone) and done.resultCode == code
    assert [e for e in events if 'log_failure' in e] == []
    *entries, done = stub.search(ldap.BASE_DN, pureldap.LDAPFilter_substrings(
        type='uid', substrings=[pureldap.LDAPFilter_substrings_initial('al')]))
    assert done.resultCode == 0 and len(entries) == 1   # well-formed substrings still match


def test_search_outside_the_tree_is_no_such_object():
    stub = Stub()
    stub.bind()
    [done] = stub.search('dc=example,dc=com')
    assert done.resultCode == 32 and stub.records[-1]['result'] == 'noSuchObject'


def root_dse(stub: Stub) -> dict:
    entry, done = stub.send(pureldap.LDAPSearchRequest(
        baseObject='', scope=pureldap.LDAP_SCOPE_baseObject,
        filter=pureldap.LDAPFilter_present('objectClass')))
    assert done.resultCode == 0
    return attrs(entry)


def test_root_dse_is_readable_anonymously_and_lists_starttls_where_offered(pki):
    plain = root_dse(Stub('plain'))
    assert plain['namingcontexts'] == [ldap.BASE_DN] and plain['vendorname'] == ['YSoft']
    assert 'supportedextension' not in plain
    assert root_dse(Stub('starttls', pki))['supportedextension'] == [ldap.STARTTLS_OID.decode()]


def test_root_dse_answers_any_case_of_objectclass_and_only_the_requested_attributes(pki):
    stub = Stub('optional', pki)
    entry, done = stub.send(pureldap.LDAPSearchRequest(
        baseObject='', scope=pureldap.LDAP_SCOPE_baseObject,
        filter=pureldap.LDAPFilter_present('objectclass'),   # ldapsearch's default filter
        attributes=['namingContexts', 'supportedLDAPVersion', 'supportedExtension',
                    'supportedSASLMechanisms']))
    assert done.resultCode == 0 and ldap._text(entry.objectName) == ''
    assert attrs(entry) == {'namingcontexts': [ldap.BASE_DN], 'supportedldapversion': ['3'],
                            'supportedextension': [ldap.STARTTLS_OID.decode()]}
    assert stub.records[-1]['op'] == 'search' and stub.records[-1]['entries'] == 1


def test_root_dse_with_all_attributes_and_other_anonymous_searches_still_refused():
    stub = Stub('plain')
    every = {'objectclass', 'namingcontexts', 'supportedldapversion', 'vendorname'}
    for wanted in ([], ['*'], ['+']):
        entry, done = stub.send(pureldap.LDAPSearchRequest(
            baseObject='', scope=pureldap.LDAP_SCOPE_baseObject,
            filter=pureldap.LDAPFilter_present('OBJECTCLASS'), attributes=wanted))
        assert set(attrs(entry)) == every, wanted
    [done] = stub.send(pureldap.LDAPSearchRequest(
        baseObject='', scope=pureldap.LDAP_SCOPE_wholeSubtree, filter=pureldap.LDAPFilter_present('objectClass')))
    assert done.resultCode == 1   # a subtree search from the root is a search: bind first
    [done] = stub.search(ldap.BASE_DN, pureldap.LDAPFilter_present('objectClass'))
    assert done.resultCode == 1


@pytest.mark.parametrize('op', [
    pureldap.LDAPAddRequest(entry='cn=x,' + ldap.GROUPS_DN, attributes=[
        (pureldap.LDAPAttributeDescription('cn'), pureldap.BERSet([pureldap.LDAPAttributeValue('x')]))]),
    pureldap.LDAPDelRequest(entry='cn=scan-users,' + ldap.GROUPS_DN),
    pureldap.LDAPModifyDNRequest(entry=ALICE, newrdn='uid=mallory', deleteoldrdn=1),
    pureldap.LDAPPasswordModifyRequest(newPasswd='x'),
])
def test_the_directory_is_read_only(op):
    stub = Stub()
    stub.bind()
    [response] = stub.send(op)
    assert response.resultCode == 53  # unwillingToPerform
    alice = fired(ldap.load_directory().lookup(ALICE))
    assert fired(alice.bind(ldap.LAB_PASSWORD)) is alice


def test_compare_needs_a_bind_then_works():
    stub = Stub()
    compare = pureldap.LDAPCompareRequest(entry=ALICE, ava=pureldap.LDAPAttributeValueAssertion(
        pureldap.LDAPAttributeDescription('uid'), pureldap.LDAPAssertionValue('alice')))
    assert stub.send(compare)[0].resultCode == 1
    stub.bind()
    assert stub.send(compare)[0].resultCode == 6  # compareTrue


def test_starttls_upgrades_the_connection(pki):
    stub = Stub('starttls', pki)
    [response] = stub.send(pureldap.LDAPStartTLSRequest())
    assert stub.transport.tls_options is tls.server_options(stub.persona)
    # The answer went out before the handshake, in clear text.
    assert [m.value.resultCode for m in decode_all(stub.transport.cleartext)] == [0]
    assert response.resultCode == 0 and response.responseName == ldap.STARTTLS_OID
    assert stub.bind().resultCode == 0
    assert [(r['op'], r['tls'], r['result']) for r in stub.records] == [
        ('starttls', False, 'success'), ('bind', True, 'success')]


def test_starttls_port_requires_tls_before_bind_and_search(pki):
    stub = Stub('starttls', pki)
    response = stub.bind()
    assert response.resultCode == 13 and 'StartTLS' in ldap._text(response.errorMessage)
    [done] = stub.search()
    assert done.resultCode == 13
    assert [r['result'] for r in stub.records] == ['confidentialityRequired'] * 2


def test_starttls_port_accepts_anonymous_bind_and_root_dse_before_tls(pki):
    stub = Stub('starttls', pki)
    assert stub.bind('', '').resultCode == 0  # ldapsearch -x binds anonymously first
    assert root_dse(stub)['supportedextension'] == [ldap.STARTTLS_OID.decode()]
    [done] = stub.search()
    assert done.resultCode == 13


def test_optional_port_serves_plaintext_and_starttls(pki):
    stub = Stub('optional', pki)
    assert stub.bind().resultCode == 0
    [response] = stub.send(pureldap.LDAPStartTLSRequest())
    assert response.resultCode == 0 and stub.transport.tls_options is not None


@pytest.mark.parametrize('security, pki_too, tls_transport, code', [
    ('plain', True, False, 2),       # not offered: protocolError
    ('optional', False, False, 2),   # optional without a certificate: plaintext only
    ('tls', True, True, 1),          # already TLS: operationsError
])
def test_starttls_refusals(pki, security, pki_too, tls_transport, code):
    stub = Stub(security, pki if pki_too else None, tls_transport=tls_transport)
    [response] = stub.send(pureldap.LDAPStartTLSRequest())
    assert isinstance(response, pureldap.LDAPExtendedResponse)
    assert (response.resultCode, response.responseName) == (code, ldap.STARTTLS_OID)
    assert stub.transport.tls_options is None
    assert stub.records[-1]['op'] == 'starttls' and stub.records[-1]['result'] != 'success'
    assert stub.bind().resultCode == 0  # the connection stays usable


def test_starttls_twice_is_an_operations_error(pki):
    stub = Stub('starttls', pki)
    stub.send(pureldap.LDAPStartTLSRequest())
    [response] = stub.send(pureldap.LDAPStartTLSRequest())
    assert response.resultCode == 1


@pytest.mark.parametrize('data, reason', [
    (b'GET / HTTP/1.1\r\nHost: x\r\n\r\n', 'not an LDAPMessage'),
    (b'\x30\x84\x7f\xff\xff\xff', 'exceeds'),
    (b'\x30\x03\x02\x01\x01', 'undecodable'),
    (ldap.encode_message(pureldap.LDAPBindResponse(resultCode=0), 1), 'not a request'),
    (ldap.encode_message(pureldap.LDAPBindRequest(dn=ALICE, auth='x'), 0), 'message id 0'),
])
def test_malformed_input_gets_a_notice_of_disconnection(data, reason):
    stub = Stub()
    stub.proto.dataReceived(data)
    [notice] = decode_all(stub.transport.value())
    assert notice.id == 0 and notice.value.responseName == NOTICE
    assert notice.value.resultCode == 2 and reason in ldap._text(notice.value.errorMessage)
    assert stub.transport.disconnecting and stub.records == []
    stub.transport.clear()
    stub.proto.dataReceived(ldap.encode_message(pureldap.LDAPBindRequest(dn=ALICE, auth='x'), 2))
    assert stub.transport.value() == b''  # nothing more is served on that connection
    assert stub.reactor.getDelayedCalls() == []


def test_request_split_across_segments_is_answered_once_complete():
    stub = Stub()
    wire = ldap.encode_message(pureldap.LDAPBindRequest(dn=ALICE, auth=ldap.LAB_PASSWORD), 1)
    for byte in wire[:-1]:
        stub.proto.dataReceived(bytes([byte]))
    assert stub.transport.value() == b''
    stub.proto.dataReceived(wire[-1:])
    assert decode_all(stub.transport.value())[0].value.resultCode == 0


def test_pipelined_requests_are_all_answered():
    stub = Stub()
    stub.proto.dataReceived(
        ldap.encode_message(pureldap.LDAPBindRequest(dn=ALICE, auth=ldap.LAB_PASSWORD), 1)
        + ldap.encode_message(pureldap.LDAPSearchRequest(
            baseObject=ldap.GROUPS_DN, filter=ldap._equality('member', ALICE)), 2))
    assert [m.id for m in decode_all(stub.transport.value())] == [1, 2, 2, 2]


def test_unbind_closes_and_idle_connections_are_dropped():
    stub = Stub()
    stub.send(pureldap.LDAPUnbindRequest())
    assert stub.transport.disconnecting
    idle = Stub()
    idle.reactor.advance(ldap.IDLE_TIMEOUT - 1)
    assert not idle.transport.disconnecting
    idle.reactor.advance(1)
    assert idle.transport.disconnected  # aborted
    idle.proto.connectionLost(Failure(ConnectionDone()))
    assert idle.reactor.getDelayedCalls() == []


def test_failing_logger_does_not_stop_the_stub():
    stub = Stub()

    def broken(record):
        raise RuntimeError('disk full')

    stub.factory.on_request = broken
    assert stub.bind().resultCode == 0


def test_listen_binds_the_right_kind_of_port(pki):
    reactor = MemoryReactorClock()
    ldap.listen(reactor, Listener('tcp', 10389, 'ldap', 'plain'), persona(), interface='198.18.0.2')
    port, _factory, backlog, interface = reactor.tcpServers[-1]
    assert (port, backlog, interface) == (10389, ldap.LISTEN_BACKLOG, '198.18.0.2')
    ldap.listen(reactor, Listener('tcp', 10636, 'ldap', 'tls'), persona(pki))
    port, wrapped, _backlog, _interface = reactor.tcpServers[-1]
    assert port == 10636 and isinstance(wrapped, TLSMemoryBIOFactory)
    assert wrapped.wrappedFactory is not None


def test_listen_refuses_what_it_cannot_serve():
    reactor = MemoryReactorClock()
    with pytest.raises(tls.TLSMaterialMissing):
        ldap.listen(reactor, Listener('tcp', 10389, 'ldap', 'starttls'), persona())
    with pytest.raises(tls.TLSMaterialMissing):
        ldap.listen(reactor, Listener('tcp', 10636, 'ldap', 'tls'), persona())
    with pytest.raises(ValueError, match='TCP'):
        ldap.listen(reactor, Listener('udp', 10389, 'ldap'), persona())
    assert reactor.tcpServers == [] and reactor.sslServers == []


def test_registry_serves_ldap_with_this_module():
    assert protocols.module_for('ldap') is ldap
    assert ldap.PROTOCOL_IDS == ('ldap',)


# --- probe, in memory -------------------------------------------------------------------

def target(**overrides) -> ProbeTarget:
    fields = dict(id='t1', host=SERVER.host, transport='tcp', protocol='ldap', port=SERVER.port,
                  timeout=2.0, server_name='stub.lab')
    fields.update(overrides)
    return ProbeTarget(**fields)


class Probe:
    def __init__(self, **overrides):
        self.clock = MemoryReactorClock()
        self.d = ldap.probe(self.clock, target(**overrides))
        clients = self.clock.sslClients if overrides.get('security') == 'tls' else self.clock.tcpClients
        self.factory = clients[-1][2] if clients else None

    def connect(self):
        self.proto = self.factory.buildProtocol(SERVER)
        self.transport = StringTransportWithDisconnection(hostAddress=CLIENT, peerAddress=SERVER)
        self.transport.protocol = self.proto
        self.proto.makeConnection(self.transport)
        return self

    def sent(self) -> list:
        messages = decode_all(self.transport.value())
        self.transport.clear()
        return messages

    def reply(self, op, message_id=None) -> None:
        if message_id is None:
            message_id = self.last_id
        self.proto.dataReceived(ldap.encode_message(op, message_id))

    @property
    def last_id(self):
        return self.proto._next_id

    def result(self) -> ProbeResult:
        result = fired(self.d)
        assert self.clock.getDelayedCalls() == []
        return result


def pump(probe: Probe, stub: Stub) -> None:
    """Move bytes both ways until both sides are quiet."""
    for _ in range(50):
        upstream = probe.transport.value()
        probe.transport.clear()
        if upstream:
            stub.proto.dataReceived(upstream)
        downstream = stub.transport.value()
        stub.transport.clear()
        if downstream:
            probe.proto.dataReceived(downstream)
        if not upstream and not downstream:
            return
    raise AssertionError('no quiet point')


def test_probe_against_stub_in_memory():
    probe, stub = Probe().connect(), Stub()
    pump(probe, stub)
    result = probe.result()
    assert result.outcome == 'ok', result
    assert result.exchange == 'LDAP bind uid=alice + search groups → 2 groups'
    assert result.peer_seen == CLIENT.host
    assert result.detail == (f'answered by terminal-server (terminal-server); bound {ALICE}; '
                             f'groups: print-users, scan-users')
    assert [r['op'] for r in stub.records] == ['bind', 'search']
    assert stub.transport.disconnecting  # the probe unbound
    assert not probe.transport.connected


def test_probe_reads_users_for_the_replicator_flow():
    probe, stub = Probe(options={'query': 'users'}).connect(), Stub()
    pump(probe, stub)
    result = probe.result()
    assert result.outcome == 'ok', result
    assert result.exchange == 'LDAP bind uid=safeq-replicator + search users → 3 users'
    assert result.detail.endswith('users: alice, bob, carol')


@pytest.mark.parametrize('options, detail', [
    ({'password': 'wrong'}, f'bind {ALICE} refused: invalidCredentials (49)'),
    ({'expect': ['safeq-admins']}, 'returned groups: print-users, scan-users; missing safeq-admins'),
    ({'base': 'ou=nowhere,dc=safeq,dc=lab'}, 'failed: noSuchObject (32)'),
])
def test_probe_reports_failed_exchanges_as_protocol_error(options, detail):
    probe, stub = Probe(options=options).connect(), Stub()
    pump(probe, stub)
    result = probe.result()
    assert result.outcome == 'protocol_error' and detail in result.detail, result
    assert result.peer_seen is None


def test_probe_with_another_user_and_expectations():
    probe, stub = Probe(options={'user': 'carol', 'password': 'carol-lab-pw',
                                 'expect': ['safeq-admins']}).connect(), Stub()
    pump(probe, stub)
    result = probe.result()
    assert result.outcome == 'ok' and result.exchange.endswith('→ 3 groups'), result


def test_probe_starttls_asks_first_and_fails_when_refused(pki):
    probe = Probe(security='starttls', ca_file=pki['ca_file']).connect()
    [request] = probe.sent()
    assert isinstance(request.value, pureldap.LDAPExtendedRequest)
    assert request.value.requestName == ldap.STARTTLS_OID
    probe.reply(pureldap.LDAPExtendedResponse(resultCode=2, errorMessage='no TLS here',
                                              responseName=ldap.STARTTLS_OID))
    result = probe.result()
    assert result.outcome == 'protocol_error'
    assert result.detail == 'StartTLS refused: protocolError (2): no TLS here'
    assert result.exchange == 'LDAP StartTLS + bind uid=alice + search groups'


def test_probe_starttls_upgrades_before_binding(pki):
    probe = Probe(security='starttls', ca_file=pki['ca_file']).connect()
    probe.sent()
    started = []
    probe.transport.startTLS = started.append
    probe.reply(pureldap.LDAPStartTLSResponse(resultCode=0, responseName=ldap.STARTTLS_OID))
    assert len(started) == 1 and probe.transport.value() == b''  # nothing before the handshake
    probe.proto.handshakeCompleted()
    [bind] = probe.sent()
    assert isinstance(bind.value, pureldap.LDAPBindRequest)


def test_probe_ldaps_waits_for_the_handshake(pki):
    probe = Probe(security='tls', ca_file=pki['ca_file'])
    host, port, _factory, creator, _timeout, _bind = probe.clock.sslClients[-1]
    assert (host, port) == (SERVER.host, SERVER.port) and creator is not None
    probe.connect()
    assert probe.transport.value() == b''
    probe.clock.advance(2.0)
    result = probe.result()
    assert result.outcome == 'silent' and 'TLS handshake' in result.detail


def test_probe_tls_handshake_failure_is_a_certificate_error(pki):
    probe = Probe(security='tls', ca_file=pki['ca_file']).connect()
    probe.proto.connectionLost(Failure(Exception('certificate verify failed')))
    result = probe.result()
    assert result.outcome == 'protocol_error' and result.detail.startswith('certificate: ')


@pytest.mark.parametrize('reply, detail', [
    (ldap.encode_message(pureldap.LDAPExtendedResponse(resultCode=2, errorMessage='bye',
                                                       responseName=NOTICE), 0),
     'notice of disconnection: protocolError (2): bye'),
    (b'HTTP/1.1 400 Bad Request\r\n\r\n', 'bad LDAP reply'),
    (ldap.encode_message(pureldap.LDAPSearchResultDone(resultCode=0), 1), 'expected LDAPBindResponse'),
    (ldap.encode_message(pureldap.LDAPBindResponse(resultCode=0), 9), 'message id 9, expected 1'),
])
def test_probe_bad_replies(reply, detail):
    probe = Probe().connect()
    probe.proto.dataReceived(reply)
    result = probe.result()
    assert result.outcome == 'protocol_error' and detail in result.detail, result
    assert not probe.transport.connected


def test_probe_against_a_server_that_does_not_say_who_it_is():
    probe = Probe().connect()
    probe.reply(pureldap.LDAPBindResponse(resultCode=0))
    probe.reply(pureldap.LDAPSearchResultEntry(f'cn=print-users,{ldap.GROUPS_DN}', [('cn', ['print-users'])]))
    probe.reply(pureldap.LDAPSearchResultEntry(f'cn=scan-users,{ldap.GROUPS_DN}', []))  # name from the DN
    probe.reply(pureldap.LDAPSearchResultDone(resultCode=0))
    result = probe.result()
    assert result.outcome == 'ok', result
    assert result.peer_seen is None and 'did not say who it is' in result.detail
    assert isinstance(probe.sent()[-1].value, pureldap.LDAPUnbindRequest)


def test_probe_times_out_without_connection_or_reply():
    probe = Probe(timeout=3.0)
    probe.clock.advance(3.0)
    result = probe.result()
    assert (result.outcome, result.elapsed) == ('timeout', 3.0) and 'no TCP connection' in result.detail
    assert probe.clock.connectors[-1].stoppedConnecting
    silent = Probe().connect()
    silent.clock.advance(2.0)
    result = silent.result()
    assert result.outcome == 'silent' and 'no bind response' in result.detail


def test_probe_connection_refused_and_early_close():
    probe = Probe()
    probe.factory.clientConnectionFailed(probe.clock.connectors[-1], Failure(ConnectionRefusedError()))
    assert probe.result().outcome == 'refused'
    closed = Probe().connect()
    closed.proto.connectionLost(Failure(ConnectionDone()))
    result = closed.result()
    assert result.outcome == 'protocol_error' and 'while waiting for the bind response' in result.detail


@pytest.mark.parametrize('overrides, detail', [
    ({'security': 'tls'}, 'ca_file'),
    ({'security': 'starttls', 'ca_file': '/nonexistent/ca.pem'}, 'No such file'),
    ({'options': {'query': 'printers'}}, 'options.query'),
    ({'options': {'expect': 'print-users'}}, 'options.expect'),
    ({'options': {'password': 1234}}, 'options.password'),
])
def test_probe_unusable_targets_are_errors_without_traffic(overrides, detail):
    probe = Probe(**overrides)
    result = probe.result()
    assert result.outcome == 'error' and detail in result.detail, result
    assert probe.clock.tcpClients == [] and probe.clock.sslClients == []


def test_probe_never_errbacks_on_udp():
    result = fired(ldap.probe(MemoryReactorClock(), target(transport='udp')))
    assert isinstance(result, ProbeResult) and result.outcome == 'error'


# --- loopback, real sockets -------------------------------------------------------------

def run_on_fresh_reactor(fn, monkeypatch, limit: float = 10.0):
    """Run ``fn(reactor)`` to completion on a new epoll reactor that TLS uses too."""
    return run_on_reactor(tls_clocked_reactor(monkeypatch), fn, limit)


def loopback(port, **overrides) -> ProbeTarget:
    fields = dict(id='lo', host='127.0.0.1', transport='tcp', protocol='ldap', port=port,
                  timeout=3.0, server_name='stub.lab')
    fields.update(overrides)
    return ProbeTarget(**fields)


def serve_and_probe(monkeypatch, security, pki, targets, before=None):
    """Start a stub with ``security``, run ``before(reactor, port)``, then probe it with each target."""
    records: list[dict] = []

    async def scenario(reactor):
        port = ldap.listen(reactor, Listener('tcp', 0, 'ldap', security), persona(pki),
                           on_request=records.append, interface='127.0.0.1')
        number = port.getHost().port
        try:
            if before is not None:
                await before(reactor, number)
            return await gatherResults([ldap.probe(reactor, loopback(number, **t)) for t in targets])
        finally:
            await maybeDeferred(port.stopListening)

    return run_on_fresh_reactor(lambda r: Deferred.fromCoroutine(scenario(r)), monkeypatch), records


@pytest.mark.parametrize('security, probe_security, exchange', [
    ('plain', 'plain', 'LDAP bind uid=alice + search groups → 2 groups'),
    ('tls', 'tls', 'LDAPS bind uid=alice + search groups → 2 groups'),
    ('starttls', 'starttls', 'LDAP StartTLS + bind uid=alice + search groups → 2 groups'),
    ('optional', 'plain', 'LDAP bind uid=alice + search groups → 2 groups'),
    ('optional', 'starttls', 'LDAP StartTLS + bind uid=alice + search groups → 2 groups'),
])
def test_loopback_exchanges(monkeypatch, pki, security, probe_security, exchange):
    [result], records = serve_and_probe(monkeypatch, security, pki,
                                        [{'security': probe_security, 'ca_file': pki['ca_file']}])
    assert (result.outcome, result.exchange, result.peer_seen) == ('ok', exchange, '127.0.0.1'), result
    encrypted = probe_security != 'plain'
    assert [(r['op'], r['tls'], r['peer']) for r in records if r['op'] != 'starttls'] == [
        ('bind', encrypted, '127.0.0.1'), ('search', encrypted, '127.0.0.1')]


def test_loopback_wrong_password_and_refused_starttls(monkeypatch, pki):
    results, records = serve_and_probe(monkeypatch, 'plain', pki, [
        {'options': {'password': 'wrong'}}, {'security': 'starttls', 'ca_file': pki['ca_file']}])
    assert [r.outcome for r in results] == ['protocol_error'] * 2
    assert 'invalidCredentials (49)' in results[0].detail
    assert results[1].detail == 'StartTLS refused: protocolError (2): StartTLS is not offered on this port'
    assert sorted((r['op'], r['result']) for r in records) == [
        ('bind', 'invalidCredentials'), ('starttls', 'protocolError')]


@pytest.mark.parametrize('security', ['tls', 'starttls'])
def test_loopback_certificate_failures(monkeypatch, pki, other_pki, security):
    results, records = serve_and_probe(monkeypatch, security, pki, [
        {'security': security, 'ca_file': other_pki['ca_file']},
        {'security': security, 'ca_file': pki['ca_file'], 'server_name': 'other.lab'}])
    for result in results:
        assert result.outcome == 'protocol_error' and result.detail.startswith('certificate: '), result
    assert [r for r in records if r['op'] != 'starttls'] == []  # no credentials went out


def test_loopback_ldaps_probe_against_plain_port_is_a_tls_error(monkeypatch, pki):
    [result], _ = serve_and_probe(monkeypatch, 'plain', pki,
                                  [{'security': 'tls', 'ca_file': pki['ca_file']}])
    assert result.outcome == 'protocol_error' and result.detail.startswith('tls: '), result


def test_loopback_stub_survives_malformed_ber(monkeypatch, pki):
    seen: list[bytes] = []

    async def garbage(reactor, port):
        for junk in (b'\x30\x84\x7f\xff\xff\xff', b'GET / HTTP/1.0\r\n\r\n', b'\x30\x03\x02\x01\x01'):
            with socket.create_connection(('127.0.0.1', port), timeout=2) as raw:
                raw.sendall(junk)
                raw.setblocking(False)
                data = b''
                for _ in range(100):  # let the stub (same reactor) answer and close
                    await deferLater(reactor, 0.01)
                    try:
                        chunk = raw.recv(4096)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        break
                    data += chunk
                seen.append(data)

    results, records = serve_and_probe(monkeypatch, 'plain', pki, [{}, {}], before=garbage)
    assert [r.outcome for r in results] == ['ok', 'ok'], results
    for data in seen:
        [notice] = decode_all(data)  # then the stub closed: recv returned b''
        assert notice.id == 0 and notice.value.responseName == NOTICE
    assert len(records) == 4


def test_loopback_many_concurrent_starttls_probes(monkeypatch, pki):
    results, records = serve_and_probe(monkeypatch, 'starttls', pki,
                                       [{'security': 'starttls', 'ca_file': pki['ca_file']}] * 30)
    assert [r.outcome for r in results] == ['ok'] * 30
    assert sum(r['op'] == 'bind' for r in records) == 30


def test_loopback_refused(monkeypatch):
    result = run_on_fresh_reactor(lambda r: ldap.probe(r, loopback(free_port())), monkeypatch)
    assert result.outcome == 'refused', result


# --- the real daemon and prober (asyncio reactor, global TLS clock) -----------------------

def test_daemon_and_prober_processes(tmp_path, pki):
    ports = {security: free_port() for security in ('plain', 'tls', 'starttls')}
    listeners = [{'transport': 'tcp', 'port': port, 'protocol': 'ldap', 'security': security}
                 for security, port in ports.items()]
    targets = [loopback(port, id=security, security=security, ca_file=pki['ca_file']).to_dict()
               for security, port in ports.items()]
    targets.append(loopback(ports['starttls'], id='replicator', security='starttls',
                            ca_file=pki['ca_file'], options={'query': 'users'}).to_dict())
    with run_stub(tmp_path, listeners, persona=pki, host='terminal-server',
                  roles=('terminal-server',)) as log:
        started = time.monotonic()
        out = subprocess.run([sys.executable, '-m', 'emulator.prober'], input=json.dumps(targets),
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        results = [ProbeResult.from_dict(r) for r in json.loads(out.stdout)]
        assert time.monotonic() - started < 15
        records = request_log(log)
        deadline = time.monotonic() + 2
        while sum(r['op'] == 'search' for r in records) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
            records = request_log(log)
    assert [(r.id, r.outcome) for r in results] == [
        ('plain', 'ok'), ('tls', 'ok'), ('starttls', 'ok'), ('replicator', 'ok')], results
    assert results[3].exchange == 'LDAP StartTLS + bind uid=safeq-replicator + search users → 3 users'
    assert all(r.peer_seen == '127.0.0.1' for r in results)
    assert {(r['port'], r['op'], r['tls']) for r in records} >= {
        (ports['plain'], 'search', False), (ports['tls'], 'search', True),
        (ports['starttls'], 'starttls', False), (ports['starttls'], 'search', True)}
