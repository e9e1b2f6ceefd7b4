"""Wire protocols: one module per protocol, each with a server stub
(``listen``) and a client probe (``probe``) sharing one codec.

The registry is explicit so that adding a protocol is one reviewed line here.
Protocols with no dedicated module yet fall back to ``framed``, which puts a
realistic payload on the real port; later modules (http, ftp, ...) replace
that fallback one protocol at a time.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Callable

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IListeningPort

from . import framed
from .base import Listener, Persona, ProbeResult, ProbeTarget

# catalog wire protocol id -> module name in this package. Only SafeQ's proprietary 'safeq' links
# speak ``framed`` on purpose; a listed module not written yet falls back to it too.
PROTOCOLS: dict[str, str] = {
    'framed': 'framed',
    'icmp': 'icmp',
    'http': 'http', 'soap': 'http', 'webdav': 'http',
    'ipp': 'ipp',
    'ftp': 'ftp',
    'ldap': 'ldap',
    'snmp': 'snmp', 'snmp-trap': 'snmp',
    'lpr': 'lpd',
    'raw': 'raw',
    'time': 'timesync',
    'terminal': 'terminal', 'discovery': 'terminal',
    'smtp': 'smtp', 'pop3': 'pop3', 'imap': 'imap',
    'pgsql': 'pgsql', 'mssql': 'mssql',
    'jmx': 'jmx', 'ajp': 'ajp', 'amqp': 'amqp',
    'ssh': 'ssh', 'mdns': 'mdns',
    'netbios-ns': 'netbios', 'netbios-dgm': 'netbios', 'smb': 'smb',
    'etcd': 'etcd', 'infinispan': 'infinispan', 'jgroups': 'jgroups',
}


def _load(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(f'{__name__}.{name}')
    except ModuleNotFoundError as exc:
        if exc.name == f'{__name__}.{name}':
            return None  # not written yet: the framed fallback serves it
        raise


def module_for(protocol_id: str) -> ModuleType:
    """The module serving ``protocol_id``: its own when registered and present, else ``framed``."""
    name = PROTOCOLS.get(protocol_id)
    module = _load(name) if name else None
    return module or framed


def preload() -> None:
    """Import every protocol module now, so no probe's timer runs while a module loads."""
    for name in set(PROTOCOLS.values()):
        _load(name)


def warm() -> None:
    """Import every protocol module and let each build what all its listeners share (a module's
    optional `warm()`): done once in the zygote, before it forks the daemons."""
    from . import tls

    tls.warm()
    for name in sorted(set(PROTOCOLS.values())):
        module = _load(name)
        if module is not None and hasattr(module, 'warm'):
            module.warm()


def prepare_more() -> bool:
    """Build one more of what a listener takes for its own (a module's optional `prepare_more()`), while
    the zygote has nothing else to do; False once every module holds enough."""
    for name in sorted(set(PROTOCOLS.values())):
        module = _load(name)
        if module is not None and hasattr(module, 'prepare_more') and module.prepare_more():
            return True
    return False


def listen(reactor, listener: Listener, persona: Persona,
           on_request: Callable[[dict[str, Any]], None] | None = None,
           interface: str = '') -> IListeningPort:
    module = module_for(listener.protocol)
    if module.listen is None:
        raise ValueError(f'protocol {listener.protocol!r} has no stub to listen with '
                         f'(the kernel answers it)')
    return module.listen(reactor, listener, persona, on_request=on_request, interface=interface)


# A probe bounds its own exchange by target.timeout; this backstop, well past that, turns a probe that
# never settles (a bug) into one 'error' row instead of a prober job that waits forever.
OVERDUE_FACTOR, OVERDUE_GRACE = 3.0, 10.0


def probe(reactor, target: ProbeTarget) -> Deferred[ProbeResult]:
    """Probe ``target`` with its protocol's module; always fires with a ProbeResult."""
    started = reactor.seconds()
    d = maybeDeferred(module_for(target.protocol).probe, reactor, target)
    exchange = f'{target.protocol}/{target.transport}'

    def crashed(failure) -> ProbeResult:
        # Keeps the prober's output aligned with its input even on a bug.
        return ProbeResult(id=target.id, outcome='error', elapsed=0.0, exchange=exchange,
                           detail=f'probe crashed: {failure.type.__name__}: {failure.getErrorMessage()}')

    def overdue(_value, timeout) -> ProbeResult:
        return ProbeResult(id=target.id, outcome='error', elapsed=max(0.0, reactor.seconds() - started),
                           exchange=exchange, detail=f'the probe never settled within {timeout:g} s (a probe bug)')

    d.addTimeout(target.timeout * OVERDUE_FACTOR + OVERDUE_GRACE, reactor, onTimeoutCancel=overdue)
    return d.addErrback(crashed)


__all__ = ['PROTOCOLS', 'module_for', 'preload', 'listen', 'probe']
