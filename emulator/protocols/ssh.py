"""``ssh``: SSH-2 (RFC 4251-4254) over twisted.conch, server stub and client probe.

Security: SSH encrypts by its own protocol. The catalog lists such ports with security
``'tls'`` (meaning "encrypted", not TLS; ``framed.NOT_TLS`` knows the same); this module accepts
``'tls'`` and ``'plain'`` and speaks plain SSH-2 on both: there is never a TLS layer.

Stub (real SSH-2, Twisted Conch): version banner ``SSH-2.0-Twisted_<version>`` (Conch's own;
``identity['ssh_banner']`` replaces it, e.g. with ``SSH-2.0-OpenSSH_9.2p1``), key exchange by
Conch (curve25519, ECDH, fixed DH groups; no group exchange: no moduli file), one Ed25519 host
key, then user authentication:

* ``password`` for the lab account ``identity['ssh_user']`` / ``identity['ssh_password']``
  (invented: ``safeq`` / ``safeq-lab``);
* ``publickey`` for the same account with the lab client key (``pki.ssh_client_key``: the file
  ``ssh_client_key`` in the directory of ``persona.ca_file``, created by whoever needs it first).

An authenticated client gets ``session`` channels only (no port forwarding, no agent, no X11, no
pty, no shell: those requests are refused). A session runs one ``exec`` command from a fixed,
invented table; nothing is ever executed on the machine:

    ``hostname``                the persona's host name (``persona.host``)
    ``hostname -f``             its lab FQDN (``<host>.lab``)
    ``uname`` / ``uname -n``    ``Linux`` / the host name
    ``whoami``                  the authenticated user
    ``echo ARGS...``            ARGS joined by one space (shell quoting honoured, nothing expanded)
    ``true`` / ``false``        exit status 0 / 1
    an empty command            exit status 0
    anything else               ``sh: 1: <word>: not found`` on stderr, exit status 127

The answer is stdout/stderr data, an ``exit-status`` request, EOF and close.

Host key: derived from the host's TLS key (``pki.ssh_host_key(persona.key_file)``), so it is fixed
for a run; without a key file, a fresh Ed25519 key per daemon. The stub publishes its public line
at listen as ``<dir of persona.ca_file>/<host>.ssh_host_key.pub`` (``pki.publish_ssh_host_key``).

Witness records (``on_request``): ``op='hello'`` per connection once the client's version line
is read (``client_version``); ``op='auth'`` per final authentication answer (``user``,
``method``, ``accepted``); ``op='exec'`` per command (``command``, ``exit_status``);
``op='refused'`` for a refused channel type or session request (``what``); ``op='error'`` for a
malformed packet (the stub sends DISCONNECT protocol error and closes). Conch bounds the version
line (4 KiB) and packets (1 MiB); silent connections are dropped after ``IDLE_TIMEOUT``.

Probe: Conch client. Key exchange; host key verified against the published key of the server
(``<dir of target.ca_file>/<short server_name>.ssh_host_key.pub``); with no ``ca_file`` there is
nothing to verify against and the key is accepted and recorded (its SHA256 fingerprint is in the
exchange text). A published file that is missing is a lab fault (``error``), a different key is a
``protocol_error``. Then authentication (the lab client key when ``ca_file`` gives the lab
directory, else the password; option ``auth`` = ``publickey`` or ``password`` forces one; options
``user``/``password``), ``exec hostname`` (option ``command``), and ``ok`` when the exit status
is 0 and the output is the server's host name (``server_name`` or its first label; any non-empty
output when the target has no ``server_name``).
"""

from __future__ import annotations

import shlex
import struct
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.conch import avatar, error as conch_error
from twisted.conch.checkers import InMemorySSHKeyDB, SSHPublicKeyChecker
from twisted.conch.interfaces import IConchUser
from twisted.conch.ssh import channel, common, connection, keys, transport
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet.defer import Deferred
from zope.interface import implementer

from emulator import pki

from .base import Listener, Persona, ProbeResult, ProbeTarget
from .probing import OnRequest, StreamProbe, crashed, error_result
from .serving import IDLE_TIMEOUT, LISTEN_BACKLOG, StubConnection

PROTOCOL_IDS = ('ssh',)

SECURITIES = ('plain', 'tls')    # 'tls' in the catalog = encrypted by SSH itself, never TLS
LAB_USER = 'safeq'               # invented lab account
LAB_PASSWORD = 'safeq-lab'
PROBE_COMMAND = 'hostname'
MAX_OUTPUT = 4096                # bytes of command output the probe keeps
MAX_RECORDED = 200               # characters of a command kept in a witness record
NOT_FOUND = 127                  # the shell's status for an unknown command


# --- keys ---------------------------------------------------------------------------------------

_host_keys: dict[tuple[str, str], Ed25519PrivateKey] = {}


def host_key(persona: Persona) -> Ed25519PrivateKey:
    """The persona's SSH host key, built once per daemon (derived from its TLS key when it has one)."""
    cache_key = (persona.key_file, persona.host)
    if cache_key not in _host_keys:
        if persona.key_file:
            private = pki.ssh_host_key(persona.key_file)
        else:
            private = Ed25519PrivateKey.generate()
        _host_keys[cache_key] = private
    return _host_keys[cache_key]


def lab_directory(ca_file: str) -> Path | None:
    """The lab's PKI directory (where ca_file lives): SSH keys are kept and published there."""
    return Path(ca_file).parent if ca_file else None


def short_host(server_name: str) -> str:
    return server_name.removesuffix(f'.{pki.LAB_DOMAIN}')


def fingerprint(key: keys.Key) -> str:
    """OpenSSH's way of showing a key: ``SHA256:<base64 without padding>``."""
    return 'SHA256:' + key.fingerprint(keys.FingerprintFormats.SHA256_BASE64).rstrip('=')


# --- the fixed command table (no shell: nothing is executed) ------------------------------------

def run_command(command: bytes, host: str, user: str) -> tuple[bytes, bytes, int]:
    """(stdout, stderr, exit status) of ``command`` from the fixed table."""
    text = command.decode('utf-8', 'replace')
    try:
        words = shlex.split(text)
    except ValueError:
        words = text.split()
    if not words:
        return b'', b'', 0
    name, args = words[0], words[1:]
    answers = {
        ('hostname',): host,
        ('hostname', '-f'): pki.server_name(host),
        ('hostname', '--fqdn'): pki.server_name(host),
        ('uname',): 'Linux',
        ('uname', '-s'): 'Linux',
        ('uname', '-n'): host,
        ('whoami',): user,
    }
    if tuple(words) in answers:
        return f'{answers[tuple(words)]}\n'.encode(), b'', 0
    if name == 'echo':
        return (' '.join(args) + '\n').encode(), b'', 0
    if tuple(words) in (('true',), ('false',)):
        return b'', b'', 0 if name == 'true' else 1
    return b'', f'sh: 1: {name[:MAX_RECORDED]}: not found\n'.encode(), NOT_FOUND


# --- server stub ----------------------------------------------------------------------------------

class _StubSession(channel.SSHChannel):
    """A session channel that runs one command from the table, then closes."""

    name = b'session'
    ran = False

    def request_exec(self, data: bytes) -> int:
        command = common.getNS(data)[0]
        if self.ran:
            return 0
        self.ran = True
        # After the request's CHANNEL_SUCCESS (sent when this returns), as sshd orders it.
        self.conn.transport.factory.reactor.callLater(0, self._answer, command)
        return 1

    def request_shell(self, data: bytes) -> int:
        return self._refuse('shell')

    def request_subsystem(self, data: bytes) -> int:
        return self._refuse('subsystem')

    def _refuse(self, what: str) -> int:
        self.conn.transport.report_request('refused', what=what)
        return 0

    def _answer(self, command: bytes) -> None:
        if self.localClosed or self.closing:
            return   # the client closed the channel or left meanwhile
        server = self.conn.transport
        stdout, stderr, status = run_command(command, server.factory.persona.host, self.avatar.username)
        if stdout:
            self.write(stdout)
        if stderr:
            self.writeExtended(connection.EXTENDED_DATA_STDERR, stderr)
        self.conn.sendRequest(self, b'exit-status', struct.pack('>L', status))
        self.conn.sendEOF(self)
        self.loseConnection()
        server.report_request('exec', user=self.avatar.username,
                              command=command.decode('utf-8', 'replace')[:MAX_RECORDED], exit_status=status)


class _StubUser(avatar.ConchUser):
    def __init__(self, username: str) -> None:
        super().__init__()
        self.username = username
        self.channelLookup[b'session'] = _StubSession


@implementer(IRealm)
class _StubRealm:
    def requestAvatar(self, avatar_id, mind, *interfaces):
        if IConchUser not in interfaces:
            raise NotImplementedError('only SSH users live here')
        return IConchUser, _StubUser(avatar_id.decode('utf-8', 'replace')), lambda: None


class _StubConnection(connection.SSHConnection):

    def ssh_CHANNEL_OPEN(self, packet: bytes) -> None:
        channel_type, rest = common.getNS(packet)
        if channel_type != b'session':
            # Refused here, not by Conch: Conch logs every refused channel open as a failure.
            sender = struct.unpack('>L', rest[:4])[0]
            self.transport.sendPacket(connection.MSG_CHANNEL_OPEN_FAILURE,
                                      struct.pack('>2L', sender, connection.OPEN_UNKNOWN_CHANNEL_TYPE)
                                      + common.NS(b'only session channels') + common.NS(b''))
            self.transport.report_request('refused', what=channel_type.decode('ascii', 'replace')[:64])
            return
        super().ssh_CHANNEL_OPEN(packet)


class _StubUserAuth:
    """Mixin over Conch's SSHUserAuthServer (see ``_conch``): witness records, injected clock."""

    loginTimeout = IDLE_TIMEOUT

    def serviceStarted(self) -> None:
        self.clock = self.transport.factory.reactor   # Conch's default is the global reactor
        super().serviceStarted()

    def auth_publickey(self, packet: bytes):
        blob = common.getNS(packet[1:], 2)[1]
        try:
            keys.Key.fromString(blob)
        except (keys.BadKeyError, ValueError, struct.error, IndexError):
            # Conch would log an unknown key type at error level: a client's mistake, not ours.
            return defer.fail(UnauthorizedLogin('unsupported key type or bad key'))
        return super().auth_publickey(packet)

    def _cbFinishedAuth(self, result) -> None:
        super()._cbFinishedAuth(result)
        self._record(True)

    def _ebBadAuth(self, reason) -> None:
        if not reason.check(conch_error.IgnoreAuthentication) and self.method != b'none':
            self._record(False)
        super()._ebBadAuth(reason)

    def _record(self, accepted: bool) -> None:
        self.transport.report_request('auth', user=(self.user or b'').decode('utf-8', 'replace')[:64],
                                      method=(self.method or b'').decode('ascii', 'replace')[:32],
                                      accepted=accepted)


class _StubTransport(StubConnection, transport.SSHServerTransport):
    """Conch's server transport with the stub's idle timeout, records and hostile-input guard."""

    def connectionMade(self) -> None:
        StubConnection.connectionMade(self)
        self.ourVersionString = self.factory.banner
        transport.SSHServerTransport.connectionMade(self)

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        had_version = self.gotVersion
        try:
            super().dataReceived(data)
        except Exception as exc:   # Conch's parsers raise on truncated or inconsistent packets
            self.report_request('error', error=f'{type(exc).__name__}: {exc}'[:MAX_RECORDED])
            self._drop(b'malformed packet')
            return
        if self.gotVersion and not had_version:
            self.report_request('hello',
                                client_version=self.otherVersionString.decode('ascii', 'replace')[:MAX_RECORDED])

    def _drop(self, reason: bytes) -> None:
        try:
            self.sendDisconnect(transport.DISCONNECT_PROTOCOL_ERROR, reason)
        except Exception:   # the cipher state itself is broken: just go
            self.transport.abortConnection()

    def receiveError(self, reason_code: int, description: bytes) -> None:
        pass   # the client said why it left; Conch would log that at error level

    def timeoutConnection(self) -> None:
        # An idle SSH client gets a graceful close (TimeoutMixin's), not the other stubs' abort:
        # kept as it was when the abort moved into StubConnection.
        self.transport.loseConnection()


class _StubFactory:
    """Mixin over Conch's SSHFactory (see ``_conch``): one persona, one host key, one portal."""

    protocol = _StubTransport
    noisy = False

    def __init__(self, reactor, persona: Persona, on_request: OnRequest | None, key: keys.Key,
                 portal: Portal) -> None:
        self.reactor = reactor
        self.persona = persona
        self.on_request = on_request
        self.portal = portal
        self.publicKeys = {key.sshType(): key.public()}
        self.privateKeys = {key.sshType(): key}
        self.primes = None   # no moduli file: Conch then offers fixed groups only
        self.banner = banner_of(persona)


def banner_of(persona: Persona) -> bytes:
    """The version line the stub sends: ``identity['ssh_banner']`` or Conch's own."""
    banner = persona.identity.get('ssh_banner')
    if not banner:
        return transport.SSHServerTransport.ourVersionString
    if not isinstance(banner, str) or not banner.isascii() or not banner.startswith('SSH-2.0-') \
            or len(banner) > 253 or any(c in banner for c in '\r\n'):
        raise ValueError(f"persona identity 'ssh_banner' must be one ASCII line 'SSH-2.0-...' "
                         f"(RFC 4253 §4.2), got {banner!r}")
    return banner.encode('ascii')


@lru_cache(maxsize=None)
def _conch() -> SimpleNamespace:
    """Conch's factory and user-auth services with our mixins, built on first use: their modules
    import the global reactor, and roled imports every protocol module before it installs one."""
    from twisted.conch.ssh import factory, userauth

    stub_auth = type('StubUserAuth', (_StubUserAuth, userauth.SSHUserAuthServer), {})
    services = {b'ssh-userauth': stub_auth, b'ssh-connection': _StubConnection}
    return SimpleNamespace(
        stub_factory=type('StubFactory', (_StubFactory, factory.SSHFactory), {'services': services}),
        probe_auth=type('ProbeUserAuth', (_ProbeUserAuth, userauth.SSHUserAuthClient), {}))


def _portal(persona: Persona, client_key: keys.Key | None) -> Portal:
    user = str(persona.identity.get('ssh_user', LAB_USER)).encode()
    passwords = InMemoryUsernamePasswordDatabaseDontUse()   # one invented lab account, by design
    passwords.addUser(user, str(persona.identity.get('ssh_password', LAB_PASSWORD)).encode())
    checkers = [passwords]
    if client_key is not None:
        checkers.append(SSHPublicKeyChecker(InMemorySSHKeyDB({user: [client_key]})))
    return Portal(_StubRealm(), checkers)


def listen(reactor, listener: Listener, persona: Persona, on_request: OnRequest | None = None,
           interface: str = ''):
    """Serve SSH-2 on ``listener`` (TCP; security 'plain' or 'tls' alike: SSH encrypts itself)."""
    if listener.transport != 'tcp':
        raise ValueError(f'ssh is a TCP protocol, not {listener.transport}')
    if listener.security not in SECURITIES:
        raise ValueError(f'ssh has no in-band upgrade; listener security {listener.security!r}')
    key = host_key(persona)
    client_key = None
    directory = lab_directory(persona.ca_file)
    if directory is not None:
        pki.publish_ssh_host_key(directory, persona.host, key)
        client_key = keys.Key(pki.ssh_client_key(directory)).public()
    ssh_factory = _conch().stub_factory(reactor, persona, on_request, keys.Key(key), _portal(persona, client_key))
    return reactor.listenTCP(listener.port, ssh_factory, backlog=LISTEN_BACKLOG, interface=interface)


# --- client probe ---------------------------------------------------------------------------------

class _Plan:
    """What the probe needs before it connects: whom to trust and how to log in."""

    def __init__(self, target: ProbeTarget) -> None:
        options = target.options
        self.user = str(options.get('user', LAB_USER)).encode()
        self.password = str(options.get('password', LAB_PASSWORD)).encode()
        self.command = str(options.get('command', PROBE_COMMAND)).encode()
        self.names = {target.server_name, short_host(target.server_name)} - {''}
        directory = lab_directory(target.ca_file)
        self.published: Path | None = None
        self.expected_key: keys.Key | None = None
        self.client_key: keys.Key | None = None
        if directory is not None and self.names:
            self.published = pki.ssh_host_key_file(directory, short_host(target.server_name))
            if self.published.is_file():
                self.expected_key = keys.Key.fromString(self.published.read_bytes().split(b'\n')[0])
        if directory is not None:
            self.client_key = keys.Key(pki.ssh_client_key(directory))
        wanted = options.get('auth')
        self.methods = [wanted] if wanted in ('publickey', 'password') else ['publickey', 'password']
        if self.client_key is None and 'publickey' in self.methods:
            self.methods.remove('publickey')


class _ProbeCommand(channel.SSHChannel):
    name = b'session'

    def __init__(self, probe: StreamProbe, plan: _Plan, **kwargs) -> None:
        super().__init__(**kwargs)
        self.probe = probe
        self.plan = plan
        self.stdout = b''
        self.stderr = b''
        self.status: int | None = None

    def channelOpen(self, specific_data: bytes) -> None:
        self.probe.stage = f'running {self.plan.command.decode()!r}'
        d = self.conn.sendRequest(self, b'exec', common.NS(self.plan.command), wantReply=True)
        d.addErrback(lambda failure: self.probe.decide(
            'protocol_error', f'exec {self.plan.command.decode()!r} refused: {failure.getErrorMessage()}'))

    def openFailed(self, reason) -> None:
        # Conch passes an OpenConnectionRefused from the server, or a bare exception when the
        # connection is lost while the channel opens.
        self.probe.decide('protocol_error', f'session channel refused: {getattr(reason, "value", reason)}')

    def dataReceived(self, data: bytes) -> None:
        self.stdout = (self.stdout + data)[:MAX_OUTPUT]

    def extReceived(self, data_type: int, data: bytes) -> None:
        self.stderr = (self.stderr + data)[:MAX_OUTPUT]

    def request_exit_status(self, data: bytes) -> int:
        self.status = struct.unpack('>L', data[:4])[0]
        return 1

    def closed(self) -> None:
        self.conn.transport.say_goodbye()
        judge(self.probe, self.plan, self.stdout, self.stderr, self.status)


def judge(probe: StreamProbe, plan: _Plan, stdout: bytes, stderr: bytes, status: int | None) -> None:
    """Decide from the command's answer: exit status 0 and the server's own host name."""
    answer = stdout.decode('utf-8', 'replace').strip()
    probe.exchange += f' → exec {plan.command.decode()!r}: {answer[:80]!r} (exit {status})'
    if status is None:
        probe.decide('protocol_error', 'the session closed without an exit status')
    elif status != 0:
        probe.decide('protocol_error', f'exit status {status}: {stderr.decode("utf-8", "replace").strip()[:200]}')
    elif not plan.names:
        probe.decide('ok' if answer else 'protocol_error',
                     'command answered (no server_name to check it against)' if answer else 'empty output')
    elif answer in plan.names:
        probe.decide('ok', f'authenticated, and the server says it is {answer}')
    else:
        probe.decide('protocol_error', f'the server says it is {answer!r}, expected {sorted(plan.names)}')


class _ProbeConnection(connection.SSHConnection):
    def __init__(self, probe: StreamProbe, plan: _Plan) -> None:
        super().__init__()
        self.probe = probe
        self.plan = plan

    def serviceStarted(self) -> None:
        super().serviceStarted()
        self.openChannel(_ProbeCommand(self.probe, self.plan, conn=self))


class _ProbeUserAuth:
    """Mixin over Conch's SSHUserAuthClient (see ``_conch``): the lab key, then the password."""

    preferredOrder = [b'publickey', b'password']   # never keyboard-interactive
    password_tried = False

    def __init__(self, probe: StreamProbe, plan: _Plan, instance) -> None:
        super().__init__(plan.user, instance)
        self.probe = probe
        self.plan = plan

    def getPublicKey(self) -> keys.Key | None:
        if 'publickey' not in self.plan.methods or self.triedPublicKeys:
            return None
        return self.plan.client_key.public()

    def getPrivateKey(self) -> Deferred[keys.Key]:
        return defer.succeed(self.plan.client_key)

    def getPassword(self, prompt=None):
        # Once: Conch asks again after every failure, and the answer would not change.
        if 'password' not in self.plan.methods or self.password_tried:
            return None
        self.password_tried = True
        return defer.succeed(self.plan.password)

    def ssh_USERAUTH_SUCCESS(self, packet: bytes) -> None:
        self.probe.exchange += f' → auth {self.lastAuth.decode()} as {self.user.decode()}'
        super().ssh_USERAUTH_SUCCESS(packet)


class _ProbeTransport(transport.SSHClientTransport):
    """Conch's client transport inside the probe lifecycle (one verdict, then release)."""

    probe: StreamProbe

    def __init__(self, plan: _Plan) -> None:
        self.plan = plan

    def connectionMade(self) -> None:
        if self.probe.connected(self):
            self.probe.stage = 'waiting for the server version'
            super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        had_version = self.gotVersion
        try:
            super().dataReceived(data)
        except Exception as exc:   # Conch's parsers raise on a malformed packet
            self.probe.decide('protocol_error', f'malformed SSH packet: {type(exc).__name__}: {exc}')
            return
        if self.gotVersion and not had_version:
            self.probe.exchange += f' → server {self.otherVersionString.decode("ascii", "replace")[:80]}'
            self.probe.stage = 'exchanging keys'

    def verifyHostKey(self, host_key_blob: bytes, md5_fingerprint: bytes) -> Deferred:
        key = keys.Key.fromString(host_key_blob)
        shown = fingerprint(key)
        if self.plan.expected_key is None:
            self.probe.exchange += f' → host key {shown} (accepted and recorded: no lab key to verify it against)'
            return defer.succeed(True)
        if key.blob() == self.plan.expected_key.blob():
            self.probe.exchange += f' → host key {shown} verified'
            return defer.succeed(True)
        self.probe.decide('protocol_error', f'host key {shown} is not the published key '
                                            f'{fingerprint(self.plan.expected_key)} ({self.plan.published})')
        return defer.fail(conch_error.ConchError('host key mismatch'))

    def connectionSecure(self) -> None:
        self.probe.stage = 'authenticating'
        self.requestService(_conch().probe_auth(self.probe, self.plan, _ProbeConnection(self.probe, self.plan)))

    def sendDisconnect(self, reason: int, description: bytes) -> None:
        # Conch gives up this way (no auth method left, bad signature, ...): that is the verdict.
        self.probe.decide('protocol_error', f'gave up while {self.probe.stage}: '
                                            f'{description.decode("utf-8", "replace")}')
        super().sendDisconnect(reason, description)

    def say_goodbye(self) -> None:
        """SSH_MSG_DISCONNECT 'by application', written before the verdict closes the socket."""
        if self.probe.result is None:
            self.sendPacket(transport.MSG_DISCONNECT, struct.pack('>L', transport.DISCONNECT_BY_APPLICATION)
                            + common.NS(b'probe done') + common.NS(b''))

    def receiveError(self, reason_code: int, description: bytes) -> None:
        self.probe.decide('protocol_error', f'server disconnected while {self.probe.stage}: '
                                            f'{description.decode("utf-8", "replace")}')

    def lost_detail(self, reason) -> str:
        return f'connection closed while {self.probe.stage}: {reason.getErrorMessage()}'

    def connectionLost(self, reason) -> None:
        try:
            transport.SSHClientTransport.connectionLost(self, reason)
        finally:  # Conch's services may raise while stopping: the probe must still hear of it
            self.probe.lost(reason)


def probe(reactor, target: ProbeTarget) -> Deferred[ProbeResult]:
    """Key exchange, host key check, login, ``exec hostname``: ok when the server names itself."""
    exchange = 'SSH-2.0 client' + (" (catalog 'tls' = SSH's own encryption)" if target.security == 'tls' else '')
    try:
        if target.transport != 'tcp':
            raise ValueError(f'ssh runs over tcp, not {target.transport}')
        plan = _Plan(target)
        if plan.published is not None and plan.expected_key is None:
            return error_result(target, exchange, f'no published SSH host key at {plan.published} '
                                                  f'(the stub writes it when it starts)')
        return StreamProbe(reactor, target, exchange).start(_ProbeTransport(plan))
    except Exception as exc:
        return crashed(target, exchange, exc)
