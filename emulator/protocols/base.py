"""Types shared by every wire-protocol module, the role daemon and the prober.

They cross process boundaries as JSON (the prober reads targets on stdin and
writes results on stdout; the daemon reads listeners from a spec file), so each
one has ``from_dict``/``to_dict`` and validates in ``__post_init__``: a bad
value is rejected where it enters, with a one-line ``ValueError`` naming the
field, instead of surfacing later as a confusing socket error.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from enum import StrEnum
from typing import Any

from .persona_schema import check_identity


class Outcome(StrEnum):
    """What a probe observed; equal to its JSON string, so records stay plain JSON."""

    OK = 'ok'
    REFUSED = 'refused'                # TCP RST or ICMP port unreachable
    TIMEOUT = 'timeout'                # no connection (SYN or datagram unanswered)
    SILENT = 'silent'                  # connected, then no complete answer: reached, not closed
    PROTOCOL_ERROR = 'protocol_error'  # an answer, but not the exchange the flow needs
    UNREACHABLE = 'unreachable'        # ICMP host/net unreachable or no route
    ERROR = 'error'                    # the probe itself failed: a lab fault, never a firewall finding


OUTCOMES = tuple(o.value for o in Outcome)
PROBE_TRANSPORTS = ('tcp', 'udp', 'icmp')
# Only TCP and UDP need a userspace stub; ICMP echo is answered by the kernel.
LISTEN_TRANSPORTS = ('tcp', 'udp')
SECURITIES = ('plain', 'tls', 'starttls', 'optional')


def _check_keys(cls: type, data: Any) -> None:
    """Reject non-objects, unknown keys (usually typos) and missing required keys."""
    if not isinstance(data, dict):
        raise ValueError(f'{cls.__name__} must be a JSON object, not {type(data).__name__}')
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f'{cls.__name__}: unknown field(s) {", ".join(map(repr, unknown))}')
    missing = [name for name, f in known.items()
               if name not in data and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise ValueError(f'{cls.__name__}: missing field(s) {", ".join(map(repr, missing))}')


def _is_int(value: Any) -> bool:
    # bool is an int subclass; a JSON `true` port is a bug, not port 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _need_str(owner: str, name: str, value: Any, allow_empty: bool = False) -> None:
    if not isinstance(value, str) or (not allow_empty and not value):
        raise ValueError(f'{owner}.{name} must be a non-empty string, got {value!r}')


def _need_choice(owner: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f'{owner}.{name} must be one of {", ".join(choices)}; got {value!r}')


def _need_port(owner: str, value: Any) -> None:
    # 0 is allowed: it asks the kernel for an ephemeral port (tests, clients).
    if not _is_int(value) or not 0 <= value <= 65535:
        raise ValueError(f'{owner}.port must be an integer 0-65535, got {value!r}')


@dataclass(frozen=True)
class ProbeTarget:
    """One flow to check: who to contact, how, and with how much payload."""

    id: str
    host: str
    transport: str
    protocol: str
    port: int | None = None
    security: str = 'plain'
    timeout: float = 2.0
    size: int = 1024
    server_name: str = ''     # the server's lab host name: TLS probes verify the certificate against it
    ca_file: str = ''         # PEM bundle of trusted CAs for TLS probes ('' = no TLS verification possible)
    # protocol-specific knobs, e.g. {'mode': 'active'}: what the client asks for, where a flow differs
    # from the protocol's default request (the audit resolves them from roles/probe_options.yaml)
    options: dict = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        owner = 'ProbeTarget'
        if not isinstance(self.options, dict):
            raise ValueError(f'{owner}.options must be a mapping, got {self.options!r}')
        _need_str(owner, 'id', self.id, allow_empty=True)
        try:
            # Literal IPv4 only: a name would need a DNS lookup, which the lab
            # does not have and which would hide the flow we mean to test.
            ipaddress.IPv4Address(self.host)
        except (ValueError, TypeError):
            raise ValueError(f'{owner}.host must be an IPv4 address, got {self.host!r}') from None
        _need_choice(owner, 'transport', self.transport, PROBE_TRANSPORTS)
        _need_str(owner, 'protocol', self.protocol)
        if self.transport == 'icmp':
            if self.port is not None:
                raise ValueError(f'{owner}.port must be null for icmp, got {self.port!r}')
        else:
            _need_port(owner, self.port)
            if self.port == 0:
                raise ValueError(f'{owner}.port 0 cannot be a destination')
        _need_choice(owner, 'security', self.security, SECURITIES)
        if not _is_number(self.timeout) or self.timeout <= 0:
            raise ValueError(f'{owner}.timeout must be a positive number of seconds, got {self.timeout!r}')
        if not _is_int(self.size) or self.size < 0:
            raise ValueError(f'{owner}.size must be a non-negative integer, got {self.size!r}')

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProbeTarget:
        _check_keys(cls, data)
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ProbeResult:
    """What one probe observed. ``outcome`` is the machine-readable verdict;
    ``exchange`` and ``detail`` are for humans reading a report."""

    id: str
    outcome: str
    elapsed: float
    exchange: str = ''
    detail: str = ''
    peer_seen: str | None = None
    tls_issuer: str = ''      # issuer CN of the certificate the server presented ('' = no TLS seen)
    # median time of the extra request/reply round trips a probe made on its open connection after
    # the exchange (framed: option 'rounds'); None = not measured
    round_trip_ms: float | None = None

    def __post_init__(self) -> None:
        owner = 'ProbeResult'
        _need_str(owner, 'id', self.id, allow_empty=True)
        _need_choice(owner, 'outcome', self.outcome, OUTCOMES)
        if not _is_number(self.elapsed) or self.elapsed < 0:
            raise ValueError(f'{owner}.elapsed must be a non-negative number, got {self.elapsed!r}')
        _need_str(owner, 'exchange', self.exchange, allow_empty=True)
        _need_str(owner, 'detail', self.detail, allow_empty=True)
        if self.peer_seen is not None:
            _need_str(owner, 'peer_seen', self.peer_seen)
        _need_str(owner, 'tls_issuer', self.tls_issuer, allow_empty=True)
        if self.round_trip_ms is not None and (not _is_number(self.round_trip_ms) or self.round_trip_ms < 0):
            raise ValueError(f'{owner}.round_trip_ms must be null or a non-negative number of milliseconds, '
                             f'got {self.round_trip_ms!r}')

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProbeResult:
        _check_keys(cls, data)
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Listener:
    """One port a role daemon must serve."""

    transport: str
    port: int
    protocol: str
    security: str = 'plain'
    bind: str = ''   # '' = every address of the host; '127.0.0.1' = localhost only (e.g. JMX from MU38)
    also: tuple[str, ...] = ()  # protocols that are HTTP underneath, served on this HTTP port too (etcd, ...)

    def __post_init__(self) -> None:
        owner = 'Listener'
        _need_choice(owner, 'transport', self.transport, LISTEN_TRANSPORTS)
        _need_port(owner, self.port)
        _need_str(owner, 'protocol', self.protocol)
        _need_choice(owner, 'security', self.security, SECURITIES)
        _need_str(owner, 'bind', self.bind, allow_empty=True)
        if not isinstance(self.also, tuple) or not all(isinstance(p, str) and p for p in self.also):
            raise ValueError(f'{owner}.also must be a list of protocol ids, got {self.also!r}')

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Listener:
        _check_keys(cls, data)
        also = data.get('also', ())
        return cls(**{**data, 'also': tuple(also) if isinstance(also, list) else also})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Persona:
    """Who a stub says it is, so a reply proves which host answered."""

    host: str
    roles: tuple[str, ...]
    address: str = ''         # the host's lab address
    cert_file: str = ''       # PEM certificate (chain) for TLS listeners, issued to `host`
    key_file: str = ''        # its private key
    ca_file: str = ''         # CAs the stub trusts (and hands to peers)
    identity: dict = field(default_factory=dict, hash=False)  # typed persona fields: persona_schema.FIELDS

    def __post_init__(self) -> None:
        _need_str('Persona', 'host', self.host)
        if not isinstance(self.identity, dict):
            raise ValueError(f'Persona.identity must be a mapping, got {self.identity!r}')
        check_identity(self.identity, 'Persona.identity')
        if not isinstance(self.roles, tuple) or not all(isinstance(r, str) and r for r in self.roles):
            raise ValueError(f'Persona.roles must be a tuple of non-empty strings, got {self.roles!r}')

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Persona:
        _check_keys(cls, data)
        roles = data['roles']
        if not isinstance(roles, list):
            raise ValueError(f'Persona.roles must be a list of strings, got {roles!r}')
        return cls(**{**data, 'roles': tuple(roles)})

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), 'roles': list(self.roles)}
