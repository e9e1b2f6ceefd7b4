"""netbios (RFC 1001/1002 name and datagram services) and smb (SMB2/3 on direct TCP): codecs,
stubs driven in memory, and each stub against its own probe on loopback.

Golden bytes come from the standards and from nmap's service probes (nmap-service-probes:
the NBTStat and SMBProgNeg probes, and the Windows answers its match lines expect).
"""
from __future__ import annotations

import re
import socket
import struct

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import gatherResults
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from emulator.protocols import netbios, smb, timesync
from emulator.protocols.base import Listener, Persona, ProbeTarget
from emulator.protocols.serving import IDLE_TIMEOUT
from tests.support import free_port, run_on_fresh_reactor

PERSONA = Persona(host='shared-folder-1.lab', roles=('shared-folder',), address='198.18.0.7')
CLIENT_UDP = ('198.18.0.9', 50137)

# nmap's NBTStat probe (node status for '*') and SMBProgNeg probe (SMB1 NEGOTIATE, 8 dialects)
NMAP_NBTSTAT = (b'\x80\xf0\x00\x10\x00\x01\x00\x00\x00\x00\x00\x00\x20\x43\x4b' + b'A' * 30 +
                b'\x00\x00\x21\x00\x01')
NMAP_SMB_NEGOTIATE = (b'\xff\x53\x4d\x42\x72\x00\x00\x00\x00\x08\x01\x40\x00\x00\x00\x00\x00\x00\x00\x00'
                      b'\x00\x00\x00\x00\x00\x00\x40\x06\x00\x00\x01\x00\x00\x81\x00\x02PC NETWORK PROGRAM '
                      b'1.0\x00\x02MICROSOFT NETWORKS 1.03\x00\x02MICROSOFT NETWORKS 3.0\x00\x02LANMAN1.0\x00'
                      b'\x02LM1.2X002\x00\x02Samba\x00\x02NT LANMAN 1.0\x00\x02NT LM 0.12\x00')
# nmap-service-probes: "Microsoft Windows netbios-ssn" and "Windows Server 2008 R2 - 2012 microsoft-ds"
NMAP_WINDOWS_NBSTAT = re.compile(rb'^\x80\xf0\x84\0\0\0\0\x01\0\0\0\0 CKAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\0\0!\0'
                                 rb'\x01\0\0\0\0\0..([\w\-]{1,15}) *\0D\0([\w\-]{1,15}) *\0\xc4\0', re.S)
NMAP_WINDOWS_SMB = re.compile(rb'^\xffSMBr\0\0\0\0\x88\x01@\0\0\0\0\0\0\0\0\0\0\0\0\0\0@\x06\0\0\x01\0'
                              rb'\x11\x07\0.2\0\x01\0\x04A\0\0\0\0\x01\0\0\0\0\0\xfc\xe3\x01\0', re.S)


class UdpTransport:
    """What a DatagramProtocol writes, without a socket."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sent: list[tuple[bytes, tuple]] = []

    def write(self, data: bytes, addr) -> None:
        self.sent.append((data, addr))

    def getHost(self):
        return IPv4Address('UDP', '0.0.0.0', self.port)


def udp_server(protocol: str, persona: Persona = PERSONA):
    records: list[dict] = []
    servers = {'netbios-ns': netbios._NameServer, 'netbios-dgm': netbios._DatagramServer}
    server = servers[protocol](persona, records.append)
    server.transport = UdpTransport(137 if protocol == 'netbios-ns' else 138)
    return server, records


# --- NetBIOS names -----------------------------------------------------------------------------

def test_first_level_encoding_matches_rfc_1001_and_nmap():
    # RFC 1001 14.1: "FRED" padded with spaces, suffix 0x20
    assert netbios.encode_name(netbios.NetbiosName('FRED', 0x20)) == \
        b'\x20' + b'EGFCEFEECACACACACACACACACACACACA' + b'\x00'
    assert netbios.encode_name(netbios.NetbiosName('*', 0)) == NMAP_NBTSTAT[12:46]


@pytest.mark.parametrize('name', [netbios.NetbiosName('SHARED-FOLDER-1', 0x20),
                                  netbios.NetbiosName('WORKGROUP', 0x1D, 'corp.example'),
                                  netbios.NetbiosName('*', 0), netbios.NetbiosName(netbios.MSBROWSE, 1)])
def test_names_round_trip(name):
    encoded = netbios.encode_name(name)
    assert netbios.decode_name(b'xx' + encoded, 2) == (name, 2 + len(encoded))


@pytest.mark.parametrize('raw', [b'\x20' + b'A' * 31, b'\x20' + b'Z' * 32 + b'\x00', b'\x10' + b'A' * 32,
                                 b'\x20' + b'A' * 32 + b'\xc0\x0c', b'\x20' + b'A' * 32 + b'\x05ab'])
def test_malformed_names_are_refused(raw):
    with pytest.raises(netbios.MalformedPacket):
        netbios.decode_name(raw, 0)


def test_identity_from_persona():
    node = netbios.NodeIdentity.from_persona(Persona(host='a-very-long-host-name.lab', roles=('x',),
                                                     identity={'workgroup': 'safeq', 'mac': '00:15:5d:01:02:03'}))
    assert node.computer == 'A-VERY-LONG-HOS' and node.workgroup == 'SAFEQ'
    assert node.mac == bytes.fromhex('00155d010203')
    assert [str(o.name) for o in node.names][:3] == ['A-VERY-LONG-HOS<00>', 'SAFEQ<00>', 'A-VERY-LONG-HOS<20>']


# --- name service stub -------------------------------------------------------------------------

def test_nmap_node_status_probe_gets_a_windows_answer():
    server, records = udp_server('netbios-ns')
    server.datagramReceived(NMAP_NBTSTAT, CLIENT_UDP)
    (reply, addr), = server.transport.sent
    assert addr == CLIENT_UDP
    match = NMAP_WINDOWS_NBSTAT.match(reply)
    assert match and match.groups() == (b'SHARED-FOLDER-1', b'WORKGROUP'), reply
    answer = netbios.decode_ns_answer(reply)
    assert len(answer.names) == 6 and answer.mac == bytes(6)
    assert records == [{'transport': 'udp', 'port': 137, 'peer': '198.18.0.9', 'op': 'node-status',
                        'name': '*<00>', 'answered': True}]


def test_name_query_for_own_name_answers_the_persona_address():
    server, records = udp_server('netbios-ns')
    query = netbios.encode_ns_query(0x1234, netbios.NetbiosName('shared-folder-1', 0x20), recursion=True)
    server.datagramReceived(query, CLIENT_UDP)
    (reply, _), = server.transport.sent
    answer = netbios.decode_ns_answer(reply)
    assert (answer.trn_id, answer.rcode, answer.addresses) == (0x1234, 0, (('198.18.0.7', False),))
    assert struct.unpack_from('>H', reply, 2)[0] == 0x8500   # response, AA, RD copied
    assert records[0]['op'] == 'name-query' and records[0]['answered'] is True


def test_group_name_is_flagged_and_address_falls_back_to_the_route():
    server, _ = udp_server('netbios-ns', Persona(host='stub', roles=('x',)))
    server.datagramReceived(netbios.encode_ns_query(7, netbios.NetbiosName('WORKGROUP', 0)), ('127.0.0.1', 5000))
    answer = netbios.decode_ns_answer(server.transport.sent[0][0])
    assert answer.addresses == (('127.0.0.1', True),)


def test_unknown_name_negative_when_unicast_silent_when_broadcast():
    server, records = udp_server('netbios-ns')
    other = netbios.NetbiosName('SOMEONE-ELSE', 0x20)
    server.datagramReceived(netbios.encode_ns_query(1, other), CLIENT_UDP)
    server.datagramReceived(netbios.encode_ns_query(2, other, broadcast=True), CLIENT_UDP)
    (reply, _), = server.transport.sent
    assert netbios.decode_ns_answer(reply).rcode == netbios.RCODE_NAM_ERR
    assert [r['answered'] for r in records] == [False, False]


@pytest.mark.parametrize('datagram', [
    b'', b'\x00' * 11, b'GARBAGE' * 20, NMAP_NBTSTAT[:30],
    NMAP_NBTSTAT[:2] + b'\x28\x10' + NMAP_NBTSTAT[4:],                 # registration opcode
    NMAP_NBTSTAT[:2] + b'\x80\x00' + NMAP_NBTSTAT[4:],                 # a response, not a request
    NMAP_NBTSTAT[:-4] + b'\x00\x0a\x00\x01',                           # NULL question type
    netbios.encode_ns_query(3, netbios.NetbiosName('OTHER', 0), netbios.TYPE_NBSTAT),
])
def test_malformed_or_foreign_requests_are_dropped(datagram):
    server, records = udp_server('netbios-ns')
    server.datagramReceived(datagram, CLIENT_UDP)
    assert server.transport.sent == [] and records == []
    server.datagramReceived(NMAP_NBTSTAT, CLIENT_UDP)   # still serving
    assert len(server.transport.sent) == 1


# --- datagram service stub ---------------------------------------------------------------------

def direct(destination: netbios.NetbiosName, user_data: bytes, kind: int = netbios.DIRECT_UNIQUE) -> bytes:
    return netbios.encode_datagram(kind, 42, '198.18.0.9', 138, netbios.NetbiosName('MOBILE-PRINT', 0),
                                   destination, user_data)


def test_mailslot_codec_round_trips():
    data = netbios.get_backup_list_request(0xDEADBEEF)
    payload = netbios.encode_mailslot(netbios.BROWSE_MAILSLOT, data)
    assert struct.unpack_from('<H', payload, 33 + 24)[0] == 86   # DataOffset of a \MAILSLOT\BROWSE write
    assert netbios.decode_mailslot(payload) == (netbios.BROWSE_MAILSLOT, data)


def test_get_backup_list_is_answered_to_the_source_name():
    server, records = udp_server('netbios-dgm')
    request = netbios.encode_mailslot(netbios.BROWSE_MAILSLOT, netbios.get_backup_list_request(0x01020304))
    server.datagramReceived(direct(netbios.NetbiosName('WORKGROUP', 0x1D), request), CLIENT_UDP)
    (reply, addr), = server.transport.sent
    packet = netbios.decode_datagram(reply)
    assert addr == CLIENT_UDP and packet.msg_type == netbios.DIRECT_UNIQUE
    assert str(packet.source) == 'SHARED-FOLDER-1<00>' and str(packet.destination) == 'MOBILE-PRINT<00>'
    assert packet.source_ip == '198.18.0.7'
    mailslot, data = netbios.decode_mailslot(packet.user_data)
    assert netbios.decode_backup_list_response(data) == (0x01020304, ['SHARED-FOLDER-1'])
    assert records[0] | {'port': 0} == {'transport': 'udp', 'port': 0, 'peer': '198.18.0.9', 'op': 'datagram',
                                        'msg_type': 'direct-unique', 'source_name': 'MOBILE-PRINT<00>',
                                        'name': 'WORKGROUP<1D>', 'answered': True,
                                        'mailslot': '\\MAILSLOT\\BROWSE', 'browser_op': 'GetBackupListRequest'}


def test_direct_datagram_to_a_foreign_name_gets_a_datagram_error():
    server, records = udp_server('netbios-dgm')
    server.datagramReceived(direct(netbios.NetbiosName('NOBODY', 0x20), b'hello'), CLIENT_UDP)
    packet = netbios.decode_datagram(server.transport.sent[0][0])
    assert (packet.msg_type, packet.error_code) == (netbios.DATAGRAM_ERROR, netbios.ERROR_NAME_NOT_PRESENT)
    assert records[0]['error_code'] == 0x82


def test_broadcast_announcement_is_recorded_without_reply():
    server, records = udp_server('netbios-dgm')
    announcement = netbios.encode_mailslot(netbios.BROWSE_MAILSLOT, b'\x01\x00' + b'\x00' * 30)
    server.datagramReceived(direct(netbios.NetbiosName('WORKGROUP', 0x1D), announcement, netbios.BROADCAST),
                            CLIENT_UDP)
    assert server.transport.sent == []
    assert records[0]['msg_type'] == 'broadcast' and records[0]['browser_op'] == 'HostAnnouncement'


def test_datagram_query_is_answered_positive_or_negative():
    server, _ = udp_server('netbios-dgm')
    for name in (netbios.NetbiosName('SHARED-FOLDER-1', 0x20), netbios.NetbiosName('NOBODY', 0x20)):
        server.datagramReceived(netbios.encode_datagram_query(netbios.QUERY_REQUEST, 9, '198.18.0.9', 138, name),
                                CLIENT_UDP)
    kinds = [netbios.decode_datagram(data).msg_type for data, _ in server.transport.sent]
    assert kinds == [netbios.POSITIVE_QUERY, netbios.NEGATIVE_QUERY]


@pytest.mark.parametrize('datagram', [b'', b'\x10' * 9, b'\x99' + b'\x00' * 20, b'\x10\x02' + b'\x00' * 12,
                                      direct(netbios.NetbiosName('X', 0), b'')[:30]])
def test_malformed_datagrams_are_dropped(datagram):
    server, records = udp_server('netbios-dgm')
    server.datagramReceived(datagram, CLIENT_UDP)
    assert server.transport.sent == [] and records == []


@pytest.mark.parametrize('listener', [Listener('udp', 0, 'netbios-ns', 'tls'), Listener('tcp', 0, 'netbios-ns'),
                                      Listener('udp', 0, 'netbios-ssn')])
def test_netbios_listen_refuses_what_netbios_is_not(listener):
    with pytest.raises(ValueError):
        netbios.listen(MemoryReactorClock(), listener, PERSONA)


# --- NetBIOS probes on loopback ----------------------------------------------------------------

def run_netbios(listeners: list[Listener], targets: list[dict], persona: Persona | None = None):
    """Stubs for ``listeners`` on 127.0.0.1 and the probes of ``targets`` (port = listener index)."""
    records: list[dict] = []
    persona = persona or Persona(host='stub', roles=('x',))

    def go(reactor):
        ports = [netbios.listen(reactor, listener, persona, records.append, interface='127.0.0.1')
                 for listener in listeners]
        probes = [netbios.probe(reactor, ProbeTarget(**{**t, 'port': ports[t['port']].getHost().port}))
                  for t in targets]

        def stop(results):
            for port in ports:
                port.stopListening()
            return results
        return gatherResults(probes).addBoth(stop)

    return run_on_fresh_reactor(go), records


def ns_target(**extra) -> dict:
    return {'id': 'ns', 'host': '127.0.0.1', 'transport': 'udp', 'protocol': 'netbios-ns', 'port': 0,
            'security': 'optional', 'timeout': 2.0, **extra}


def dgm_target(**extra) -> dict:
    return {**ns_target(**extra), 'id': 'dgm', 'protocol': 'netbios-dgm'}


def test_ns_probe_resolves_and_lists_names():
    results, records = run_netbios(
        [Listener('udp', 0, 'netbios-ns', 'optional')],
        [ns_target(server_name='stub.lab'), ns_target(),
         ns_target(server_name='stub.lab', options={'query': 'status'})])
    assert [r.outcome for r in results] == ['ok', 'ok', 'ok'], results
    assert 'STUB<20>' in results[0].exchange and '127.0.0.1' in results[0].detail
    assert 'no TLS in NetBIOS' in results[0].exchange
    assert 'STUB<00>' in results[1].detail
    assert [r['op'] for r in records] == ['name-query', 'node-status', 'node-status']


def test_ns_probe_fails_on_wrong_name_or_address():
    results, _ = run_netbios(
        [Listener('udp', 0, 'netbios-ns')],
        [ns_target(server_name='other.lab'), ns_target(server_name='stub.lab', options={'address': '198.18.0.99'}),
         ns_target(server_name='other.lab', options={'query': 'status'})])
    assert [r.outcome for r in results] == ['protocol_error'] * 3, results
    assert 'RCODE 3' in results[0].detail and '198.18.0.99' in results[1].detail and 'OTHER' in results[2].detail


def test_dgm_probe_gets_the_backup_list():
    results, records = run_netbios(
        [Listener('udp', 0, 'netbios-dgm', 'optional')],
        [dgm_target(server_name='stub.lab'), dgm_target(server_name='stub.lab', options={'workgroup': 'OTHER'}),
         dgm_target(server_name='wrong.lab')])
    assert [r.outcome for r in results] == ['ok', 'protocol_error', 'protocol_error'], results
    assert 'GetBackupListResponse [STUB]' in results[0].exchange
    assert 'destination name not present' in results[1].detail and 'WRONG' in results[2].detail
    assert {r['op'] for r in records} == {'datagram'}


def test_netbios_probe_against_a_closed_port_is_refused():
    port = free_port(socket.SOCK_DGRAM)
    result = run_on_fresh_reactor(lambda reactor: netbios.probe(reactor, ProbeTarget(**ns_target(port=port))))
    assert result.outcome == 'refused'


# --- SMB codec ---------------------------------------------------------------------------------

def test_frames_are_length_prefixed_and_bounded():
    buffer = bytearray(smb.frame(b'abc') + smb.frame(b'de')[:5])
    assert smb.take_frames(buffer) == [b'abc'] and buffer == bytearray(b'\x00\x00\x00\x02d')
    with pytest.raises(ValueError):
        smb.take_frames(bytearray(struct.pack('>I', smb.MAX_MESSAGE + 1)))
    with pytest.raises(ValueError):
        smb.take_frames(bytearray(b'\x81\x00\x00\x44'))   # NetBIOS session request: port 139 talk


def test_spnego_and_ntlmssp_round_trip():
    assert smb.mech_token(smb.spnego_server_hello()) == (b'', None)
    negotiate = smb.ntlm_negotiate()
    assert smb.mech_token(smb.spnego_init(negotiate)) == (negotiate, None)
    challenge = smb.ntlm_challenge(smb.NEGOTIATE_FLAGS, 'STUB', 'stub.lab', 0.0)
    assert smb.mech_token(smb.spnego_response(smb.ACCEPT_INCOMPLETE, challenge, mech=True)) == \
        (challenge, smb.ACCEPT_INCOMPLETE)
    assert smb.ntlm_message_type(challenge) == 2 and smb.from_utf16(challenge[56:64]) == 'STUB'
    login = smb.parse_authenticate(smb.ntlm_anonymous_authenticate('SCANNER'))
    assert login == smb.Authenticate(user='', domain='', workstation='SCANNER', anonymous=True)


@pytest.mark.parametrize('blob', [b'', b'\x60\x05\x06\x03abc', b'\xa1\x84\xff\xff\xff\xff', b'\x30\x00',
                                  b'NTLMSSP\x00\x03\x00'])
def test_bad_security_blobs_are_malformed(blob):
    with pytest.raises(smb.Malformed):
        token, _ = smb.mech_token(blob)
        smb.parse_authenticate(token)


def test_store_drops_oldest_closed_files_for_room():
    store = smb.ShareStore(limit=100, max_files=3)
    first, second = store.create('s', 'a', 0), store.create('s', 'b', 0)
    store.write(first, 0, b'x' * 60, 0)
    second.opened = 1
    store.write(second, 0, b'y' * 30, 0)
    third = store.create('s', 'c', 0)
    store.write(third, 0, b'z' * 50, 0)            # needs room: 'a' (closed, oldest) goes
    assert store.get('S', 'A') is None and store.used == 80
    with pytest.raises(smb.SmbError):
        store.write(third, 0, b'z' * 90, 0)        # 'b' is open: cannot make room
    assert [f.name for f in store.listing('s')] == ['b', 'c']


# --- SMB stub in memory -----------------------------------------------------------------------

SMB_SERVER = IPv4Address('TCP', '198.18.0.7', 445)
SMB_CLIENT = IPv4Address('TCP', '198.18.0.9', 50000)


def smb_server(persona: Persona = PERSONA):
    clock = MemoryReactorClock()
    records: list[dict] = []
    smb.listen(clock, Listener('tcp', SMB_SERVER.port, 'smb'), persona, on_request=records.append)
    proto = clock.tcpServers[-1][1].buildProtocol(SMB_CLIENT)
    transport = StringTransport(hostAddress=SMB_SERVER, peerAddress=SMB_CLIENT)
    proto.makeConnection(transport)
    return proto, transport, records


def request(command: int, body: bytes, message_id: int, session_id: int = 0, tree_id: int = 0) -> bytes:
    return smb.frame(smb.Header(command, message_id=message_id, session_id=session_id, tree_id=tree_id,
                                credits=8).pack() + body)


def replies(transport: StringTransport) -> list[tuple[smb.Header, bytes]]:
    data = bytearray(transport.value())
    transport.clear()
    return [(smb.Header.unpack(m), m) for m in smb.take_frames(data)]


def logged_in(proto, transport, dialects=smb.PROBE_DIALECTS) -> int:
    proto.dataReceived(request(smb.NEGOTIATE, smb.negotiate_request(dialects), 0))
    proto.dataReceived(request(smb.SESSION_SETUP, smb.session_setup_request(smb.spnego_init(smb.ntlm_negotiate())), 1))
    (header, _), = replies(transport)[1:]
    assert header.status == smb.STATUS['MORE_PROCESSING_REQUIRED']
    blob = smb.spnego_response(token=smb.ntlm_anonymous_authenticate())
    proto.dataReceived(request(smb.SESSION_SETUP, smb.session_setup_request(blob), 2, header.session_id))
    (done, message), = replies(transport)
    assert done.status == 0 and struct.unpack_from('<H', message, 66)[0] == 0x2   # IS_NULL
    return header.session_id


def test_smb_negotiate_picks_the_highest_common_dialect():
    for dialects, chosen in (((0x0202,), 0x0202), ((0x0210, 0x0302), 0x0302), (smb.PROBE_DIALECTS, 0x0311)):
        proto, transport, records = smb_server()
        proto.dataReceived(request(smb.NEGOTIATE, smb.negotiate_request(dialects), 0))
        (header, message), = replies(transport)
        size, security, dialect, contexts = struct.unpack_from('<HHHH', message, 64)
        assert (header.status, size, security, dialect) == (0, 65, 1, chosen)
        assert contexts == (1 if chosen == 0x0311 else 0)
        assert records == [{'transport': 'tcp', 'port': 445, 'peer': '198.18.0.9', 'op': 'negotiate',
                            'dialect': smb.DIALECTS[chosen]}]


def test_nmap_smb1_negotiate_gets_a_windows_server_answer():
    proto, transport, records = smb_server()
    proto.dataReceived(smb.frame(NMAP_SMB_NEGOTIATE))
    answer = transport.value()[4:]
    assert NMAP_WINDOWS_SMB.match(answer), answer[:60]
    assert answer.endswith(smb.utf16('WORKGROUP') + b'\0\0' + smb.utf16('SHARED-FOLDER-1') + b'\0\0')
    assert records[0]['dialect'] == 'NT LM 0.12'
    proto.dataReceived(smb.frame(NMAP_SMB_NEGOTIATE))     # SMB1 stops at NEGOTIATE
    assert transport.disconnecting


def test_smb1_multi_protocol_negotiate_switches_to_smb2():
    proto, transport, _ = smb_server()
    offer = b''.join(b'\x02' + d + b'\x00' for d in (b'NT LM 0.12', b'SMB 2.002', b'SMB 2.???'))
    proto.dataReceived(smb.frame(NMAP_SMB_NEGOTIATE[:33] + struct.pack('<BH', 0, len(offer)) + offer))
    (header, message), = replies(transport)
    assert header.command == smb.NEGOTIATE and struct.unpack_from('<H', message, 68)[0] == 0x02FF
    proto.dataReceived(request(smb.NEGOTIATE, smb.negotiate_request(), 1))
    assert struct.unpack_from('<H', replies(transport)[0][1], 68)[0] == 0x0311


def test_smb_session_tree_and_file_round_trip_in_memory():
    proto, transport, records = smb_server()
    session = logged_in(proto, transport)
    proto.dataReceived(request(smb.TREE_CONNECT, smb.tree_connect_request('\\\\SHARED-FOLDER-1\\scans'), 3, session))
    (tree, message), = replies(transport)
    assert tree.status == 0 and message[66] == smb.DISK_SHARE
    proto.dataReceived(request(smb.CREATE, smb.create_request('scan.pdf'), 4, session, tree.tree_id))
    (created, message), = replies(transport)
    file_id = message[128:144]
    proto.dataReceived(request(smb.WRITE, smb.write_request(file_id, 0, b'%PDF-1.7 scan'), 5, session, tree.tree_id))
    proto.dataReceived(request(smb.READ, smb.read_request(file_id, 5, 100), 6, session, tree.tree_id))
    proto.dataReceived(request(smb.CLOSE, smb.close_request(file_id), 7, session, tree.tree_id))
    (written, _), (read, message), (closed, _) = replies(transport)
    assert [created.status, written.status, read.status, closed.status] == [0, 0, 0, 0]
    assert message[80:] == b'1.7 scan'
    assert [r['op'] for r in records] == ['negotiate', 'session-setup', 'tree-connect', 'write-file']
    assert records[-1] | {'port': 0} == {'transport': 'tcp', 'port': 0, 'peer': '198.18.0.9', 'op': 'write-file',
                                         'share': 'scans', 'name': 'scan.pdf', 'bytes': 13, 'size': 13}


def test_smb_errors_keep_the_connection_serving():
    proto, transport, records = smb_server(Persona(host='nas', roles=('x',), identity={'smb_shares': ['scans']}))
    session = logged_in(proto, transport)
    proto.dataReceived(request(smb.TREE_CONNECT, smb.tree_connect_request('\\\\nas\\other'), 3, session))
    proto.dataReceived(request(smb.CREATE, smb.create_request('x'), 4, session, 99))     # no such tree
    proto.dataReceived(request(smb.OPLOCK_BREAK, b'', 5, session))                       # not supported
    proto.dataReceived(request(smb.WRITE, b'\x31\x00', 6, session))                       # truncated body
    proto.dataReceived(request(smb.ECHO, struct.pack('<HH', 4, 0), 7))
    statuses = [smb.STATUS_NAMES[h.status] for h, _ in replies(transport)]
    assert statuses == ['BAD_NETWORK_NAME', 'NETWORK_NAME_DELETED', 'NOT_SUPPORTED', 'INVALID_PARAMETER', 'SUCCESS']
    assert records[-1] == {'transport': 'tcp', 'port': 445, 'peer': '198.18.0.9', 'op': 'tree-connect',
                           'share': 'other', 'status': 'BAD_NETWORK_NAME'}
    assert not transport.disconnecting


@pytest.mark.parametrize('data', [b'GARBAGE\r\n' * 8, smb.frame(b'\xfeSMB' + b'\x00' * 10),
                                  smb.frame(b'\xfdSMB' + b'\x00' * 60),
                                  request(smb.ECHO, struct.pack('<HH', 4, 0), 0),         # before NEGOTIATE
                                  struct.pack('>I', smb.MAX_MESSAGE + 1)])
def test_smb_hostile_frames_close_the_connection(data):
    proto, transport, _ = smb_server()
    proto.dataReceived(data)
    assert transport.disconnecting and transport.value() == b''
    proto.connectionLost(Failure(ConnectionDone()))


def test_smb_second_negotiate_closes_and_idle_connections_time_out():
    proto, transport, _ = smb_server()
    proto.dataReceived(request(smb.NEGOTIATE, smb.negotiate_request(), 0))
    proto.dataReceived(request(smb.NEGOTIATE, smb.negotiate_request(), 1))
    assert transport.disconnecting
    clock = MemoryReactorClock()
    records: list[dict] = []
    smb.listen(clock, Listener('tcp', 445, 'smb'), PERSONA, on_request=records.append)
    idle = clock.tcpServers[-1][1].buildProtocol(SMB_CLIENT)
    idle_transport = StringTransport(hostAddress=SMB_SERVER, peerAddress=SMB_CLIENT)
    idle.makeConnection(idle_transport)
    clock.advance(IDLE_TIMEOUT + 1)
    assert idle_transport.disconnecting


def test_smb_listen_is_plain_tcp_only():
    for listener in (Listener('tcp', 0, 'smb', 'tls'), Listener('udp', 0, 'smb')):
        with pytest.raises(ValueError):
            smb.listen(MemoryReactorClock(), listener, PERSONA)


# --- SMB probe on loopback ---------------------------------------------------------------------

def run_smb(targets: list[dict], persona: Persona | None = None):
    records: list[dict] = []
    persona = persona or Persona(host='stub', roles=('x',))

    def go(reactor):
        port = smb.listen(reactor, Listener('tcp', 0, 'smb'), persona, records.append, interface='127.0.0.1')
        probes = [smb.probe(reactor, ProbeTarget(**{'id': 'smb', 'host': '127.0.0.1', 'transport': 'tcp',
                                                    'protocol': 'smb', 'port': port.getHost().port,
                                                    'timeout': 5.0, **t})) for t in targets]
        return gatherResults(probes).addBoth(lambda results: (port.stopListening(), results)[1])

    return run_on_fresh_reactor(go), records


def test_smb_probe_writes_and_reads_back():
    results, records = run_smb([{'size': 300_000, 'server_name': 'stub.lab'}, {'size': 0}])
    assert [r.outcome for r in results] == ['ok', 'ok'], results
    assert 'SMB 3.1.1' in results[0].exchange and 'read back identical' in results[0].detail
    writes = [r for r in records if r['op'] == 'write-file']
    assert [w['bytes'] for w in writes] == [300_000] and writes[0]['share'] == 'scans'
    assert sum(r['op'] == 'session-setup' and r['anonymous'] for r in records) == 2


def test_smb_probe_reports_a_refused_share():
    results, _ = run_smb([{'size': 10, 'options': {'share': 'nope'}}],
                         Persona(host='stub', roles=('x',), identity={'smb_shares': ['scans']}))
    assert results[0].outcome == 'protocol_error' and 'BAD_NETWORK_NAME' in results[0].detail


def test_smb_probe_against_a_non_smb_server_is_a_protocol_error():
    def go(reactor):
        # An RFC 868 time server sends 4 bytes and closes: not an SMB session message.
        tcp = timesync.listen(reactor, Listener('tcp', 0, 'time'), PERSONA, interface='127.0.0.1')
        target = ProbeTarget(id='x', host='127.0.0.1', transport='tcp', protocol='smb',
                             port=tcp.getHost().port, timeout=2.0)
        return smb.probe(reactor, target).addBoth(lambda result: (tcp.stopListening(), result)[1])

    result = run_on_fresh_reactor(go)
    assert result.outcome == 'protocol_error', result


def test_smb_probe_against_a_closed_port_is_refused():
    result = run_on_fresh_reactor(lambda reactor: smb.probe(reactor, ProbeTarget(
        id='x', host='127.0.0.1', transport='tcp', protocol='smb', port=free_port(), timeout=2.0)))
    assert result.outcome == 'refused'
