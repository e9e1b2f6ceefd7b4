"""Bounded fuzzing of every served stub on loopback (issue 9, "stubs survive hostile input").

All stubs run in this process on a fresh reactor in a background thread, so the test sees what
they log (Twisted's global log publisher) and which sockets they hold (/proc/self/fd). For each
protocol it sends random bytes, truncated and mutated valid messages and a few known-hostile
inputs (deeply nested JSON, pipelined requests then a close), then checks that:

* the stub still answers its own probe (``ok``),
* nothing was logged as a failure or at critical level (a traceback where a one-line rejection
  belongs),
* the stub's sockets went back to what they were before (no CLOSE_WAIT left behind).

Seeded (``SEED``) and count-bounded (``INPUTS`` per protocol), so a run is reproducible and short.
The totals table is printed at the end of every pytest run (CI's included); assertion messages carry it too.
"""
from __future__ import annotations

import os
import random
import socket
import ssl
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field

import pytest
from ldaptor.protocols import pureldap
from pamqp import commands
from twisted.conch.ssh.transport import SSHClientTransport
from twisted.internet.testing import StringTransport
from twisted.internet.threads import blockingCallFromThread
from twisted.logger import LogLevel, globalLogPublisher
from twisted.protocols import tls as twisted_tls

import roles as role_data
from emulator import pki, protocols
from emulator.protocols import ajp, amqp, framed, ipp, jgroups, jmx, ldap, mdns, mssql, netbios, pgsql, smb, snmp
from emulator.protocols.base import Listener, Persona, ProbeTarget
from tests.support import fresh_reactor

SEED = 20240509
INPUTS = 100                # fuzz inputs per protocol (plus the fixed hostile ones): bounded for CI
READ_WAIT = 0.02            # seconds a fuzz client waits for an answer before it hangs up
SETTLE = 2.0                # seconds the stub gets to close what the fuzz clients left
FD_SLACK = 2                # sockets a stub may hold beyond its baseline after settling
ROLES = ('terminal-server', 'spooler-controller', 'mfd', 'management', 'ldap-server',
         'payment-system', 'terminal-ultralight', 'mail-server')

DEEP_JSON = b'[' * 1000 + b']' * 1000


@dataclass
class Kind:
    """One served (protocol, transport, security) and the valid messages its fuzz starts from."""

    name: str
    protocol: str
    transport: str
    security: str
    seeds: list[bytes]
    hostile: list[bytes] = field(default_factory=list)
    wrap_tls: bool = False          # the fuzz client speaks TLS first (implicit TLS ports)
    port: int = 0


def _framed_frame(payload: bytes) -> bytes:
    return struct.pack('!I', len(payload)) + payload


def _http(method: str, path: str, body: bytes = b'', headers: dict[str, str] | None = None) -> bytes:
    lines = [f'{method} {path} HTTP/1.1', 'Host: stub.lab', f'Content-Length: {len(body)}']
    lines += [f'{k}: {v}' for k, v in (headers or {}).items()]
    return ('\r\n'.join(lines) + '\r\n\r\n').encode('latin-1') + body


def _kinds() -> list[Kind]:
    hello = framed.encode_request('fuzz', b'x' * 32)
    deep_framed = DEEP_JSON + b'\n'
    login = framed.encode({'v': 1, 'op': 'login', 'seq': 1, 'card': '12345678', 'size': 0})
    discover = framed.encode({'v': 1, 'op': 'discover', 'nonce': 'fuzz', 'size': 0})
    soap = (b'<?xml version="1.0"?><soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/">'
            b'<soap:Body><LoginByCard xmlns="urn:safeq"><cardId>1234</cardId></LoginByCard>'
            b'</soap:Body></soap:Envelope>')
    propfind = (b'<?xml version="1.0"?><D:propfind xmlns:D="DAV:"><D:allprop/></D:propfind>')
    http_seeds = [
        _http('GET', '/'),
        _http('POST', '/accounting', b'{"card": "1234"}', {'Content-Type': 'application/json'}),
        _http('POST', '/', soap, {'Content-Type': 'text/xml', 'SOAPAction': '"LoginByCard"'}),
        _http('PROPFIND', '/scan/', propfind, {'Depth': '1', 'Content-Type': 'text/xml'}),
        _http('PUT', '/scan/fuzz.pdf', b'%PDF-1.4\n' + b'x' * 200, {'Content-Type': 'application/pdf'}),
    ]
    http_hostile = [
        _http('POST', '/accounting', DEEP_JSON, {'Content-Type': 'application/json'}),
        _http('GET', '/') + _http('GET', '/'),          # pipelined, then the client closes
        b'GET / HTTP/9.9.9\r\n\r\n',                      # bad version line
        b'GET / HTTP/1.1\r\nHost: \xff\xfe\r\n\r\n',
    ]
    ipp_body = ipp.encode(ipp.get_printer_attributes_request(1, 'ipp://stub.lab/ipp/print', 'fuzz'))
    ipp_seeds = [_http('POST', '/ipp/print', ipp_body, {'Content-Type': 'application/ipp'})]
    ipp_hostile = [
        _http('POST', '/ipp/print', ipp_body, {'Content-Type': 'application/ipp\xe9'}),
        ipp_seeds[0] + ipp_seeds[0],
    ]
    bind = ldap.encode_message(pureldap.LDAPBindRequest(dn=b'cn=fuzz', auth=b'x'), 1)
    search = ldap.encode_message(pureldap.LDAPSearchRequest(
        baseObject=b'dc=lab', filter=pureldap.LDAPFilter_present('uid')), 2)
    # Filters ldaptor's matcher cannot evaluate (it raised or asserted, logging tracebacks).
    lab_bind = ldap.encode_message(pureldap.LDAPBindRequest(dn=b'uid=alice,ou=people,dc=safeq,dc=lab',
                                                            auth=ldap.LAB_PASSWORD), 1)
    bad_filter = lab_bind + b''.join(
        ldap.encode_message(pureldap.LDAPSearchRequest(baseObject=ldap.BASE_DN, filter=f), 2 + i)
        for i, f in enumerate([
            pureldap.LDAPFilter_substrings(type='uid', substrings=[]),
            pureldap.LDAPFilter_approxMatch(attributeDesc=pureldap.LDAPAttributeDescription('uid'),
                                            assertionValue=pureldap.LDAPAssertionValue('alice')),
            pureldap.LDAPFilter_extensibleMatch(matchingRule=None, type=None, matchValue='x',
                                                dnAttributes=False)]))
    starttls = ldap.encode_message(pureldap.LDAPStartTLSRequest(), 1)
    snmp_get = snmp.get_request('public', [snmp.SYS_DESCR]).message
    snmp_printer = snmp.get_request('public', [snmp.PRT_MARKER_LIFE_COUNT, snmp.PRT_GENERAL_SERIAL_NUMBER]).message
    root_dse = ldap.encode_message(pureldap.LDAPSearchRequest(
        baseObject=b'', scope=pureldap.LDAP_SCOPE_baseObject, filter=pureldap.LDAPFilter_present('objectclass'),
        attributes=[b'namingContexts', b'supportedExtension']), 1)
    lpd_seeds = [b'\x02print\n\x0224 cfA001fuzz\nHfuzz\nPfuzz\n', b'\x01print\n', b'\x03print\n']
    raw_seeds = [b'\x1b%-12345X@PJL INFO STATUS\r\n\x1b%-12345X', b'%!PS\nshowpage\n']
    ftp_seeds = [b'USER scan\r\nPASS nope\r\nSTAT\r\n', b'USER scan\r\nPASS scan\r\nSTAT\r\nQUIT\r\n',
                 b'USER x\r\nPASS y\r\n']
    return [
        Kind('framed tcp', 'safeq', 'tcp', 'plain', [_framed_frame(hello)], [_framed_frame(deep_framed)]),
        Kind('framed tls', 'safeq', 'tcp', 'tls', [_framed_frame(hello)], [_framed_frame(deep_framed)],
             wrap_tls=True),
        Kind('framed udp', 'safeq', 'udp', 'plain', [hello], [deep_framed]),
        Kind('terminal', 'terminal', 'tcp', 'plain', [_framed_frame(login)], [_framed_frame(deep_framed)]),
        Kind('terminal starttls', 'terminal', 'tcp', 'starttls', [_framed_frame(login)],
             [_framed_frame(deep_framed)]),
        Kind('terminal tls', 'terminal', 'tcp', 'tls', [_framed_frame(login)], [_framed_frame(deep_framed)],
             wrap_tls=True),
        Kind('discovery', 'discovery', 'udp', 'plain', [discover], [deep_framed]),
        Kind('http', 'http', 'tcp', 'plain', http_seeds, http_hostile),
        Kind('http tls', 'http', 'tcp', 'tls', http_seeds, http_hostile, wrap_tls=True),
        Kind('soap', 'soap', 'tcp', 'plain', http_seeds[2:3], http_hostile),
        Kind('soap tls', 'soap', 'tcp', 'tls', http_seeds[2:3], http_hostile, wrap_tls=True),
        Kind('webdav', 'webdav', 'tcp', 'plain', http_seeds[3:], http_hostile),
        Kind('webdav tls', 'webdav', 'tcp', 'tls', http_seeds[3:], http_hostile, wrap_tls=True),
        Kind('ipp', 'ipp', 'tcp', 'plain', ipp_seeds, ipp_hostile),
        Kind('ipps', 'ipp', 'tcp', 'tls', ipp_seeds, ipp_hostile, wrap_tls=True),
        Kind('lpd', 'lpr', 'tcp', 'plain', lpd_seeds),
        Kind('raw', 'raw', 'tcp', 'plain', raw_seeds),
        Kind('ldap', 'ldap', 'tcp', 'plain', [bind + search, root_dse], [bad_filter, bind + bad_filter]),
        Kind('ldap starttls', 'ldap', 'tcp', 'starttls', [starttls], [bad_filter]),
        Kind('ldaps', 'ldap', 'tcp', 'tls', [bind + search], [bad_filter], wrap_tls=True),
        Kind('snmp udp', 'snmp', 'udp', 'plain', [snmp_get, snmp_printer], [b'GARBAGE', b'\x30\x03\x02\x01']),
        Kind('snmp tcp', 'snmp', 'tcp', 'plain', [snmp_get, snmp_printer], [b'\x30\x82\x00\x05\x04\x03abc' + b'\x00' * 5]),
        Kind('time udp', 'time', 'udp', 'plain', [b'', b'x']),
        Kind('ftp', 'ftp', 'tcp', 'plain', ftp_seeds),
    ] + _mail_kinds() + _database_kinds() + _cluster_kinds() + _ssh_mdns_kinds() + _java_side_kinds() + _windows_kinds()


def _mail_kinds() -> list[Kind]:
    mail_login = b'a1 LOGIN safeq safeq-lab-mail\r\na2 SELECT INBOX\r\n'
    smtp_seeds = [b'EHLO fuzz\r\nMAIL FROM:<scan@safeq.lab>\r\nRCPT TO:<alice@safeq.lab>\r\nDATA\r\n'
                  b'Subject: fuzz\r\n\r\nbody\r\n.\r\nQUIT\r\n',
                  b'EHLO fuzz\r\nAUTH PLAIN AHNhZmVxAHNhZmVxLWxhYi1tYWls\r\n',
                  b'EHLO fuzz\r\nAUTH LOGIN\r\nc2FmZXE=\r\neA==\r\n']
    smtp_hostile = [b'AUTH PLAIN !!!\r\nAUTH\r\n\xff\xfe\r\n', b'x' * 20000,
                    b'EHLO x\r\nMAIL FROM:<' + b'a' * 5000 + b'>\r\n', b'EHLO x\r\nSTARTTLS\r\nSTARTTLS\r\n']
    pop3_seeds = [b'USER safeq\r\nPASS safeq-lab-mail\r\nSTAT\r\nLIST\r\nUIDL\r\nRETR 1\r\nTOP 1 5\r\nQUIT\r\n',
                  b'APOP safeq 0123456789abcdef0123456789abcdef\r\n', b'CAPA\r\nAUTH\r\nAUTH PLAIN\r\nAAAA\r\n']
    pop3_hostile = [b'USER safeq\r\nPASS safeq-lab-mail\r\nLIST 0\r\nUIDL x\r\nDELE 99\r\nRSET\r\nLAST\r\nRPOP x\r\n',
                    b'x' * 5000]
    imap_seeds = [mail_login + b'a3 FETCH 1:* (BODY[] BODYSTRUCTURE ENVELOPE FLAGS INTERNALDATE RFC822.SIZE)\r\n'
                  b'a4 UID SEARCH ALL\r\na5 LOGOUT\r\n',
                  b'a1 AUTHENTICATE PLAIN\r\nAHNhZmVxAHNhZmVxLWxhYi1tYWls\r\na2 LIST "" *\r\n'
                  b'a3 STATUS INBOX (MESSAGES UIDNEXT)\r\n', b'a1 CAPABILITY\r\na2 NOOP\r\n']
    imap_hostile = [b'a1 LOGIN {5}\r\nsafeq {14}\r\nsafeq-lab-mail\r\n',
                    mail_login + b'a3 FETCH 1:* (BODY[1.2.3] BODY[HEADER.FIELDS.NOT (X)] RFC822 RFC822.TEXT)\r\n'
                    b'a4 SEARCH OR FROM x NOT TO y\r\na5 SEARCH SINCE 1-Jan-2020 LARGER 5 TEXT pdf\r\n',
                    mail_login + b'a3 IDLE\r\nDONE\r\na4 EXAMINE inbox\r\na5 CLOSE\r\na6 STATUS INBOX (BOGUS)\r\n']
    return [
        Kind('smtp', 'smtp', 'tcp', 'plain', smtp_seeds, smtp_hostile),
        Kind('smtp optional', 'smtp', 'tcp', 'optional', smtp_seeds, smtp_hostile),
        Kind('smtps', 'smtp', 'tcp', 'tls', smtp_seeds, smtp_hostile, wrap_tls=True),
        Kind('pop3', 'pop3', 'tcp', 'plain', pop3_seeds, pop3_hostile),
        Kind('pop3s', 'pop3', 'tcp', 'tls', pop3_seeds, pop3_hostile, wrap_tls=True),
        Kind('imap', 'imap', 'tcp', 'plain', imap_seeds, imap_hostile),
        Kind('imaps', 'imap', 'tcp', 'tls', imap_seeds, imap_hostile, wrap_tls=True),
    ]


def _database_kinds() -> list[Kind]:
    pg_startup = pgsql.startup_message({'user': 'safeq', 'database': 'safeq', 'application_name': 'fuzz'})
    pg_seeds = [pg_startup, pgsql.ssl_request(), pg_startup + pgsql.message(b'p', b'md5' + b'0' * 32 + b'\0'),
                struct.pack('!IIII', 16, 80877102, 1234, 5678)]
    pg_hostile = [b'\0\0\0\xa4\xff\x53\x4d\x42' + b'\0' * 156, pgsql.ssl_request() + pg_startup,
                  b'\x7f\xff\xff\xff' + b'\0' * 8, pgsql.message(b'Q', b'SELECT 1\0') * 3]
    tds_prelogin_off = mssql.packets(mssql.PRELOGIN, mssql.encode_prelogin(
        [(mssql.PL_VERSION, b'\x0f\0\0\0\0\0'), (mssql.PL_ENCRYPTION, b'\0'), (mssql.PL_INSTOPT, b'MSSQLServer\0')]))
    tds_prelogin_none = mssql.packets(mssql.PRELOGIN, mssql.encode_prelogin(
        [(mssql.PL_VERSION, b'\x0f\0\0\0\0\0'), (mssql.PL_ENCRYPTION, b'\x02')]))
    tds_login = mssql.packets(mssql.LOGIN7, mssql.encode_login7('safeq', 'safeq-lab-pw', 'safeq', 'fuzz', 'stub.lab'))
    tds_batch = mssql.packets(mssql.SQL_BATCH, struct.pack('<IIHQI', 22, 18, 2, 0, 1) + 'SELECT 1'.encode('utf-16-le'))
    tds_seeds = [tds_prelogin_off, tds_prelogin_none + tds_login + tds_batch]
    tds_hostile = [b'\x12\x01\xff\xff\0\0\0\0' + b'\0' * 64, tds_batch,
                   mssql.packets(mssql.LOGIN7, b'\xff' * 94), tds_prelogin_none + tds_login + tds_batch * 3]
    return [
        Kind('pgsql optional', 'pgsql', 'tcp', 'optional', pg_seeds, pg_hostile),
        Kind('mssql optional', 'mssql', 'tcp', 'optional', tds_seeds, tds_hostile),
    ]


def _cluster_kinds() -> list[Kind]:
    etcd_put = _http('POST', '/v3/kv/put', b'{"key": "L3NhZmVxL2xvY2tzL21mZC0x", "value": "YWxpY2U="}',
                     {'Content-Type': 'application/json'})
    etcd_range = _http('POST', '/v3/kv/range', b'{"key": "AA==", "range_end": "AA=="}')
    etcd_seeds = [etcd_put, etcd_range, _http('GET', '/version')]
    etcd_hostile = [_http('POST', '/v3/kv/put', DEEP_JSON), _http('POST', '/v3/kv/range', b'{"key": 5}'),
                    etcd_put + etcd_range]
    ispn_put = _http('PUT', '/rest/v2/caches/jobs/J-1', b'{"id": "J-1"}', {'Content-Type': 'application/json'})
    ispn_seeds = [ispn_put, _http('GET', '/rest/v2/caches/jobs/J-1'), _http('GET', '/rest/v2/caches'),
                  _http('DELETE', '/rest/v2/caches/jobs/J-1')]
    ispn_hostile = [_http('PUT', '/rest/v2/caches/jobs/%ff%00', b'x'), _http('GET', '/rest/v2/caches/' + 'a/' * 50),
                    ispn_put + ispn_put]
    asker = uuid.UUID(int=1)
    discovery = jgroups.encode_message(jgroups.Discovery(
        type=jgroups.GET_MBRS_REQ, cluster='ISPN', sender=asker,
        data=jgroups.PingData(asker, 0, 'fuzz', jgroups.IpAddress('127.0.0.1', 7800))))
    preamble = jgroups.encode_preamble(jgroups.IpAddress('127.0.0.1', 7800))
    jg_tcp = [preamble + jgroups.frame(discovery)]
    jg_hostile = [preamble + b'\x7f\xff\xff\xff', preamble + jgroups.frame(b'\x00' * 40), b'bela\xff\xff']
    return [
        Kind('etcd', 'etcd', 'tcp', 'plain', etcd_seeds, etcd_hostile),
        Kind('infinispan', 'infinispan', 'tcp', 'plain', ispn_seeds, ispn_hostile),
        Kind('jgroups tcp', 'jgroups', 'tcp', 'plain', jg_tcp, jg_hostile),
        Kind('jgroups tcp opt', 'jgroups', 'tcp', 'optional', jg_tcp, jg_hostile),
        Kind('jgroups udp', 'jgroups', 'udp', 'plain', [discovery], [b'\x28\x8c', discovery[:-3]]),
        Kind('jgroups udp opt', 'jgroups', 'udp', 'optional', [discovery], [b'\x28\x8c']),
    ]


def _java_side_kinds() -> list[Kind]:
    rmi_list = (jmx.protocol_header() + jmx.endpoint('127.0.0.1', 0)
                + jmx.call(jmx.ObjID(0), 1, jmx.REGISTRY_INTERFACE_HASH) + bytes((jmx.PING,)))
    rmi_lookup = (jmx.protocol_header() + jmx.endpoint('127.0.0.1', 0)
                  + jmx.call(jmx.ObjID(0), 2, jmx.REGISTRY_INTERFACE_HASH) + jmx.string_object('jmxrmi'))
    ajp_get = ajp.CPING_PACKET + ajp.ForwardRequest('GET', '/', headers=[('host', 'stub.lab')]).encode()
    ajp_post = (ajp.ForwardRequest('POST', '/x', headers=[('content-length', '4')]).encode()
                + ajp.server_packet(b'\x00\x04abcd'))
    amqp_session = (amqp.PROTOCOL_HEADER + amqp.method_frame(commands.Connection.StartOk(
        {}, 'PLAIN', amqp.plain_response(amqp.LAB_USER, amqp.LAB_PASSWORD), 'en_US'))
        + amqp.method_frame(commands.Connection.TuneOk(2047, 131072, 0))
        + amqp.method_frame(commands.Connection.Open('/')) + amqp.method_frame(commands.Channel.Open(), 1))
    return [
        Kind('jmx', 'jmx', 'tcp', 'plain', [rmi_list, rmi_lookup],
             [jmx.protocol_header(jmx.SINGLE_OP_PROTOCOL) + b'\x50\xac\xed\x00\x05\x7a\x7f\xff\xff\xff']),
        Kind('ajp', 'ajp', 'tcp', 'plain', [ajp_get, ajp_post], [b'GET / HTTP/1.0\r\n\r\n', b'\x12\x34\xff\xff']),
        Kind('amqp', 'amqp', 'tcp', 'plain', [amqp_session], [b'AMQP\x01\x01\x00\x0a', b'\x01\x00\x00\x7f\xff\xff\xff']),
        Kind('amqps', 'amqp', 'tcp', 'tls', [amqp_session], [b'AMQP\x01\x01\x00\x0a'], wrap_tls=True),
    ]


def _windows_kinds() -> list[Kind]:
    nb_status = netbios.encode_ns_query(0x4242, netbios.NetbiosName('*', 0), netbios.TYPE_NBSTAT)
    nb_query = netbios.encode_ns_query(0x4243, netbios.NetbiosName('STUB', 0x20))
    backup_list = netbios.encode_datagram(
        netbios.DIRECT_UNIQUE, 7, '127.0.0.1', 0, netbios.NetbiosName('FUZZ', 0),
        netbios.NetbiosName('WORKGROUP', 0x1D),
        netbios.encode_mailslot(netbios.BROWSE_MAILSLOT, netbios.get_backup_list_request(1)))
    smb_negotiate = smb.frame(smb.Header(smb.NEGOTIATE).pack() + smb.negotiate_request())
    smb_session = smb.frame(smb.Header(smb.SESSION_SETUP, message_id=1).pack() +
                            smb.session_setup_request(smb.spnego_init(smb.ntlm_negotiate())))
    smb_smb1 = smb.frame(b'\xffSMBr' + bytes(27) + b'\x00\x0c\x00\x02NT LM 0.12\x00')
    smb_chain = smb.frame(smb.Header(smb.ECHO, next_command=64).pack() + smb.Header(smb.ECHO).pack())
    return [
        Kind('netbios-ns', 'netbios-ns', 'udp', 'optional', [nb_status, nb_query],
             [nb_query[:12] + b'\xc0\x0c' + nb_query[-4:]]),
        Kind('netbios-dgm', 'netbios-dgm', 'udp', 'optional', [backup_list],
             [backup_list[:10] + b'\xff\xff\x00\x00' + backup_list[14:]]),
        Kind('smb', 'smb', 'tcp', 'plain', [smb_negotiate, smb_negotiate + smb_session, smb_smb1],
             [b'\x00\xff\xff\xff', smb_negotiate + smb_chain, smb_negotiate + smb_negotiate]),
    ]


def _ssh_client_hello() -> bytes:
    """What an SSH client sends first: its version line and KEXINIT (Conch's client, in memory)."""
    client = SSHClientTransport()
    client.makeConnection(StringTransport())
    return client.transport.value()


def _ssh_mdns_kinds() -> list[Kind]:
    # The catalog's 'tls' on SSH's port means SSH's own encryption: the fuzz client speaks no TLS there.
    return [
        Kind('ssh', 'ssh', 'tcp', 'tls', [_ssh_client_hello(), b'SSH-2.0-OpenSSH_9.2p1\r\n'],
             [b'SSH-2.0-fuzz\r\n' + b'\xff' * 64, b'x' * 5000, b'SSH-1.5-old\r\n']),
        Kind('mdns', 'mdns', 'udp', 'plain', [mdns.ptr_query(b'_ipp._tcp.local', 7)], [b'', b'\xff' * 12]),
    ]


def _inputs(kind: Kind, rng: random.Random) -> list[bytes]:
    """The fixed hostile inputs, then INPUTS random ones: noise, truncations, mutations."""
    out = list(kind.hostile)
    for index in range(INPUTS):
        seed = rng.choice(kind.seeds)
        style = index % 4
        if style == 0:
            out.append(rng.randbytes(rng.randrange(1, 600)))
        elif style == 1:
            out.append(seed[:rng.randrange(0, max(1, len(seed)))])
        elif style == 2:
            data = bytearray(seed)
            for _ in range(rng.randrange(1, 8)):
                if data:
                    data[rng.randrange(len(data))] = rng.randrange(256)
            out.append(bytes(data))
        else:   # a valid message followed by a mutated one, on one connection
            data = bytearray(seed)
            cut = rng.randrange(0, max(1, len(data)))
            out.append(seed + bytes(data[:cut]) + rng.randbytes(rng.randrange(0, 40)))
    return out


# --- the stubs, in this process ------------------------------------------------------------

class _Capture:
    """Counts logged failures and critical events (each would be a traceback in a daemon's log)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[dict] = []

    def __call__(self, event: dict) -> None:
        if 'log_failure' in event or event.get('log_level') in (LogLevel.critical, LogLevel.error):
            with self.lock:
                self.events.append(event)

    def take(self) -> list[str]:
        with self.lock:
            events, self.events = self.events, []
        lines = []
        for event in events:
            failure = event.get('log_failure')
            what = f'{failure.type.__name__}: {failure.getErrorMessage()}' if failure else ''
            lines.append(f"{event.get('log_format', '')!s:.80} {what}".strip())
        return lines


def _server_sockets() -> int:
    count = 0
    for name in os.listdir('/proc/self/fd'):
        try:
            if os.readlink(f'/proc/self/fd/{name}').startswith('socket:'):
                count += 1
        except OSError:
            pass
    return count


@pytest.fixture(scope='module')
def stubs(tmp_path_factory):
    material = pki.make_test_pki(tmp_path_factory.mktemp('pki'), host='stub.lab', address='127.0.0.1')
    persona = Persona.from_dict({**material, 'host': 'stub', 'roles': list(ROLES), 'identity': role_data.identity(ROLES)})
    kinds = _kinds()
    reactor = fresh_reactor()
    patch = pytest.MonkeyPatch()
    patch.setattr(twisted_tls, '_get_default_clock', lambda: reactor)
    capture = _Capture()
    globalLogPublisher.addObserver(capture)
    thread = threading.Thread(target=reactor.run, kwargs={'installSignalHandlers': False}, daemon=True)
    thread.start()
    ports = []
    try:
        for kind in kinds:
            listener = Listener(transport=kind.transport, port=0, protocol=kind.protocol,
                                security=kind.security)
            port = blockingCallFromThread(reactor, protocols.listen, reactor, listener, persona,
                                          interface='127.0.0.1')
            ports.append(port)
            kind.port = port.getHost().port
        yield reactor, kinds, material, capture
    finally:
        for port in ports:
            try:
                blockingCallFromThread(reactor, port.stopListening)
            except Exception:
                pass
        reactor.callFromThread(reactor.stop)
        thread.join(10)
        globalLogPublisher.removeObserver(capture)
        patch.undo()


def _client_tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _send(kind: Kind, data: bytes, tls_context: ssl.SSLContext) -> None:
    """One fuzz input on its own connection (or datagram); an answer is read briefly, not judged."""
    if kind.transport == 'udp':
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(READ_WAIT)
            s.sendto(data[:8192], ('127.0.0.1', kind.port))
            try:
                s.recv(65536)
            except OSError:
                pass
        return
    raw = socket.create_connection(('127.0.0.1', kind.port), timeout=2)
    sock = raw
    try:
        if kind.wrap_tls:
            sock = tls_context.wrap_socket(raw, server_hostname='stub.lab')
        sock.sendall(data)
        sock.settimeout(READ_WAIT)
        try:
            sock.recv(65536)
        except (OSError, ssl.SSLError):
            pass
    except (OSError, ssl.SSLError):
        pass   # the stub may close first: that is an answer too
    finally:
        sock.close()


def _probe(reactor, kind: Kind, material: dict):
    target = ProbeTarget(id=kind.name, host='127.0.0.1', transport=kind.transport, protocol=kind.protocol,
                         port=kind.port, security=kind.security, timeout=5.0, server_name='stub.lab',
                         ca_file=material['ca_file'])
    return blockingCallFromThread(reactor, protocols.probe, reactor, target)


def _settled(baseline: int) -> int:
    deadline = time.monotonic() + SETTLE
    while True:
        extra = _server_sockets() - baseline
        if extra <= FD_SLACK or time.monotonic() > deadline:
            return extra
        time.sleep(0.05)


def _table(rows: list[dict]) -> str:
    head = f"{'protocol':<18} {'inputs':>6} {'crashes':>7} {'stopped':>7} {'leaks':>5} {'tracebacks':>10}"
    lines = [head, '-' * len(head)]
    for r in rows:
        lines.append(f"{r['name']:<18} {r['inputs']:>6} {r['crashes']:>7} {r['stopped']:>7} "
                     f"{r['leaks']:>5} {r['tracebacks']:>10}")
    total = {k: sum(r[k] for r in rows) for k in ('inputs', 'crashes', 'stopped', 'leaks', 'tracebacks')}
    lines.append('-' * len(head))
    lines.append(f"{'total':<18} {total['inputs']:>6} {total['crashes']:>7} {total['stopped']:>7} "
                 f"{total['leaks']:>5} {total['tracebacks']:>10}")
    return '\n'.join(lines)


def test_every_stub_survives_fuzzing(stubs, record_summary):
    reactor, kinds, material, capture = stubs
    rng = random.Random(SEED)
    tls_context = _client_tls()
    rows, details = [], []
    started = time.monotonic()
    for kind in kinds:
        before = _probe(reactor, kind, material)
        assert before.outcome == 'ok', f'{kind.name} did not answer before fuzzing: {before.detail}'
        capture.take()
        baseline = _server_sockets()
        inputs = _inputs(kind, rng)
        crashes = 0
        for data in inputs:
            try:
                _send(kind, data, tls_context)
            except Exception as exc:   # the fuzz client itself failed: count it, keep going
                crashes += 1
                details.append(f'{kind.name}: client {type(exc).__name__}: {exc}')
        leaks = max(0, _settled(baseline) - FD_SLACK)
        after = _probe(reactor, kind, material)
        stopped = int(after.outcome != 'ok')
        tracebacks = capture.take()
        if stopped:
            details.append(f'{kind.name}: probe after fuzzing {after.outcome}: {after.detail}')
        if leaks:
            details.append(f'{kind.name}: {leaks} socket(s) still open {SETTLE:g} s after the clients left')
        details += [f'{kind.name}: logged {line}' for line in tracebacks[:3]]
        rows.append({'name': kind.name, 'inputs': len(inputs), 'crashes': crashes, 'stopped': stopped,
                     'leaks': leaks, 'tracebacks': len(tracebacks)})
    table = _table(rows)
    record_summary(f'fuzzing every served protocol (seed {SEED}, {time.monotonic() - started:.1f} s)\n{table}')
    bad = [r for r in rows if r['crashes'] or r['stopped'] or r['leaks'] or r['tracebacks']]
    assert not bad, f'\n{table}\n' + '\n'.join(details)
