"""Role daemon: serves every port of one lab host's SafeQ roles.

Run inside a lab host as ``python -m emulator.roled SPEC.json``::

    {"host": "mfd-km", "roles": ["mfd"],
     "listeners": [{"transport": "tcp", "port": 21, "protocol": "ftp", "security": "plain"}],
     "log": "/path/requests.jsonl",     (optional: one JSON line per valid request)
     "interface": ""}                   (optional: bind address, "" = all)

Stdout is a one-line handshake for whoever started the daemon:
``READY <n>`` once all n listeners are bound, or ``ERROR <what>: <reason>``
and a non-zero exit: 1 when binding fails (after closing what was opened),
2 when the spec is unusable. After READY it serves until SIGTERM/SIGINT and
exits 0.

The request log is the *second witness* of a flow: the probe says it got
through, and the daemon says it saw that client on that port.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from . import netns, protocols
from .jobs import JobServerFactory
from .protocols import jobstore
from .protocols.base import Listener, Persona
from .protocols.tls import TLSMaterialMissing

EXIT_BIND = 1
EXIT_SPEC = 2
_SPEC_KEYS = {'persona', 'host', 'roles', 'listeners', 'log', 'interface', 'control'}

_log = Logger()


class SpecError(ValueError):
    """The spec cannot be used as given."""


class BindError(Exception):
    """A listener could not be bound."""

    def __init__(self, listener: Listener, reason: str) -> None:
        super().__init__(f'{listener.transport}/{listener.port}: {reason}')
        self.listener = listener
        self.reason = reason


@dataclass(frozen=True)
class Spec:
    persona: Persona
    listeners: tuple[Listener, ...]
    log: str | None = None
    interface: str = ''
    control: str = ''     # Unix socket path where the daemon takes probe jobs for its host


def parse_spec(data: Any) -> Spec:
    if not isinstance(data, dict):
        raise SpecError(f'spec must be a JSON object, not {type(data).__name__}')
    unknown = sorted(set(data) - _SPEC_KEYS)
    if unknown:
        raise SpecError(f'unknown key(s) {", ".join(map(repr, unknown))}')
    missing = sorted({'host', 'roles', 'listeners'} - set(data))
    if missing:
        raise SpecError(f'missing key(s) {", ".join(map(repr, missing))}')
    try:
        extra = data.get('persona', {})
        if not isinstance(extra, dict):
            raise SpecError('persona must be a JSON object')
        persona = Persona.from_dict({**extra, 'host': data['host'], 'roles': data['roles']})
    except ValueError as exc:
        raise SpecError(str(exc)) from None
    if not isinstance(data['listeners'], list):
        raise SpecError('listeners must be a list')
    listeners = []
    seen = set()
    for index, item in enumerate(data['listeners']):
        try:
            listener = Listener.from_dict(item)
        except (ValueError, TypeError) as exc:
            raise SpecError(f'listeners[{index}]: {exc}') from None
        where = f'listeners[{index}] {listener.transport}/{listener.port}'
        # Port 0 would bind somewhere nobody can learn from READY.
        if listener.port == 0:
            raise SpecError(f'{where}: port 0 is not servable')
        if (listener.transport, listener.port) in seen:
            raise SpecError(f'{where}: listed twice')
        if protocols.module_for(listener.protocol).listen is None:
            raise SpecError(f'{where}: protocol {listener.protocol!r} has no stub')
        seen.add((listener.transport, listener.port))
        listeners.append(listener)
    log = data.get('log')
    if log is not None and (not isinstance(log, str) or not log):
        raise SpecError(f'log must be a non-empty path or null, got {log!r}')
    interface = data.get('interface', '')
    if not isinstance(interface, str):
        raise SpecError(f'interface must be a string, got {interface!r}')
    control = data.get('control', '')
    if not isinstance(control, str):
        raise SpecError(f'control must be a socket path, got {control!r}')
    return Spec(persona=persona, listeners=tuple(listeners), log=log, interface=interface, control=control)


def load_spec(path: str) -> Spec:
    try:
        with open(path, encoding='utf-8') as handle:
            data = json.load(handle)
    except OSError as exc:
        raise SpecError(f'cannot read {path}: {exc.strerror or exc}') from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise SpecError(f'{path} is not JSON: {exc}') from None
    return parse_spec(data)


MAX_RECORDS_PER_PORT = 10_000   # request-log lines per (transport, port), beyond each client's first


def request_logger(reactor, spec: Spec,
                   max_per_port: int = MAX_RECORDS_PER_PORT) -> Callable[[dict[str, Any]], None] | None:
    """A callback appending one JSON line per valid request, or None without a log.

    The log is bounded: the first record of every (peer, transport, port) is always written
    (one is all the audit needs to witness a flow), every other record only while its
    (transport, port) has fewer than ``max_per_port`` lines. The first record refused on a port
    is replaced by one line ``{"transport", "port", "dropped": true, "limit", "note"}`` (it has
    no ``peer``: it witnesses nothing), after which that port's repeat records are dropped
    silently.

    Each line is one unbuffered write() in append mode, so the log stays complete on disk even if
    the daemon is killed (the file is opened once: opening it per line made the reactor release
    and retake the GIL half a dozen times per request, each a wait when an FTP thread was busy).
    """
    if spec.log is None:
        return None
    path = spec.log
    # Fail now rather than lose the second witness silently later.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    flows: set[tuple[Any, Any, Any]] = set()          # (peer, transport, port) already recorded
    lines: dict[tuple[Any, Any], int] = {}            # (transport, port) -> lines written
    full: set[tuple[Any, Any]] = set()                # ports whose 'dropped' line is written

    def write(record: dict[str, Any]) -> None:
        line = json.dumps({'time': reactor.seconds(), 'host': spec.persona.host, **record})
        try:
            os.write(fd, (line + '\n').encode('utf-8'))
        except OSError:
            _log.failure('cannot append to request log {path}', path=path)

    def append(record: dict[str, Any]) -> None:
        where = (record.get('transport'), record.get('port'))
        flow = (record.get('peer'), *where)
        if flow not in flows:
            flows.add(flow)
        elif lines.get(where, 0) >= max_per_port:
            if where not in full:
                full.add(where)
                write({'transport': where[0], 'port': where[1], 'dropped': True, 'limit': max_per_port,
                       'note': 'request log full for this port: further requests are not recorded, '
                               'except the first from each new client'})
            return
        lines[where] = lines.get(where, 0) + 1
        write(record)

    return append


def _one_line(text: str) -> str:
    return ' '.join(str(text).split())


def start_listeners(reactor, spec: Spec | dict[str, Any]) -> list[IListeningPort]:
    """Bind every listener of ``spec`` (a Spec, or its JSON dict), all or nothing.

    Raises SpecError for a bad dict, BindError (after stopping the ports
    already opened) when one cannot be bound, or OSError when the request log
    cannot be opened.
    """
    if not isinstance(spec, Spec):
        spec = parse_spec(spec)
    on_request = request_logger(reactor, spec)
    ports: list[IListeningPort] = []
    for listener in spec.listeners:
        try:
            ports.append(protocols.listen(reactor, listener, spec.persona,
                                          on_request=on_request, interface=listener.bind or spec.interface))
        except (CannotListenError, OSError, TLSMaterialMissing) as exc:
            stop_listeners(ports)
            reason = getattr(exc, 'socketError', None) or exc
            raise BindError(listener, _one_line(reason)) from exc
    return ports


def stop_listeners(ports: list[IListeningPort]) -> Deferred:
    return gatherResults([maybeDeferred(port.stopListening) for port in ports],
                         consumeErrors=True)


def _say(line: str) -> None:
    # stdout is read line by line by whoever started us: flush every line.
    print(line, flush=True)


def _log_to_stderr() -> None:
    from twisted.logger import (FilteringLogObserver, LogLevel, LogLevelFilterPredicate,
                                globalLogBeginner, textFileLogObserver)
    observer = FilteringLogObserver(textFileLogObserver(sys.stderr),
                                    [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def _raise_file_limit(wanted: int = 8192) -> None:
    # An audit probes ~1000 ports at once from some hosts; the common soft limit of 1024 fds is too few.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


@dataclass(frozen=True)
class Member:
    """One host a daemon process serves: its spec, its handshake line, its network namespace."""
    spec_path: str
    say: Callable[[str], None] = _say
    namespace: int | None = None   # fd of the host's network namespace (emulator.netns); None: the process's own


@dataclass
class HostService:
    """What a daemon runs for one of its hosts: stopped on its own (a stub down) or with the process."""
    member: Member
    ports: list[IListeningPort]
    stopped: bool = False

    def stop(self) -> Deferred:
        self.stopped = True
        return stop_listeners(self.ports)


def start_host(reactor, member: Member, on_stop: Callable[['HostService'], int]) -> HostService | int:
    """Start one host's listeners (and its job server); its HostService, or the exit status of its failure
    (said as the host's ERROR line)."""
    say = member.say
    try:
        spec = load_spec(member.spec_path)
    except SpecError as exc:
        say(f'ERROR spec: {_one_line(exc)}')
        return EXIT_SPEC
    if member.namespace is not None:
        reactor = netns.HostReactor(reactor, member.namespace)
    try:
        # inside the host's namespace for the whole start: threads a stub starts (pyftpdlib's) stay there
        with netns.made_in(reactor):
            ports = start_listeners(reactor, spec)
    except BindError as exc:
        say(f'ERROR {exc}')
        return EXIT_BIND
    except OSError as exc:
        say(f'ERROR log {spec.log}: {_one_line(exc.strerror or exc)}')
        return EXIT_BIND
    service = HostService(member, ports)
    if spec.control:
        # The daemon is also its host's prober: it already runs inside the host's namespace with
        # every protocol module loaded, so an audit costs no process start-ups per host.
        protocols.preload()
        ports.append(reactor.listenUNIX(spec.control, JobServerFactory(reactor, spec.persona,
                                                                       stop=lambda: on_stop(service))))
        # Documents kept for workflows go to files beside the control socket (in the run
        # directory, removed with the run), not to this daemon's heap.
        if not jobstore.spooling():
            jobstore.spool_in(os.path.splitext(spec.control)[0] + '.spool')
            reactor.addSystemEventTrigger('after', 'shutdown', jobstore.drop_spool)
    return service


def serve(members: list[Member]) -> int:
    """Serve every member host until stopped: 0, or the failure's status when none could start.

    Each host says its own handshake. A host that cannot start says ERROR and the others serve on
    (whoever started them decides); a host stopped by its job server says EXITED 0, and the process
    ends with its last host.
    """
    from twisted.internet import reactor

    _raise_file_limit()
    reactor.suggestThreadPoolSize(64)  # FTP probes run ftplib in threads: let many run at once
    services: list[HostService] = []

    def stop_one(service: HostService) -> int:
        service.stop().addBoth(lambda _: service.member.say(f'EXITED 0 {os.getpid()}'))
        if all(s.stopped for s in services):
            reactor.callLater(0, reactor.stop)
        return len(service.ports)

    failure = 0
    for member in members:
        started = start_host(reactor, member, stop_one)
        if isinstance(started, int):
            failure = failure or started
        else:
            services.append(started)
    if not services:
        return failure
    _log_to_stderr()
    reactor.addSystemEventTrigger('before', 'shutdown',
                                  lambda: gatherResults([s.stop() for s in services if not s.stopped]))
    # READY only once running: by then the SIGTERM handler is installed, so a
    # caller that signals right after READY gets a clean stop, not a kill.
    for service in services:
        reactor.callWhenRunning(service.member.say, f'READY {len(service.ports)}')
    reactor.run()
    return 0


def main(argv: list[str] | None = None, say: Callable[[str], None] = _say) -> int:
    """Serve one spec in this process's namespace until stopped; `say` carries the handshake."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        say('ERROR usage: python -m emulator.roled SPEC.json')
        return EXIT_SPEC
    return serve([Member(argv[0], say)])


if __name__ == '__main__':
    sys.exit(main())
