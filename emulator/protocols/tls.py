"""TLS plumbing shared by every protocol module: server options from a persona, verifying clients.

Servers present the host's certificate (issued by the lab CA, or the customer's); clients verify
the chain against the target's CA bundle and the host name, as a real SafeQ component should.

ALPN: a server picks the first protocol of its own list that the client offers, or none at all
when there is no overlap (the handshake goes on without ALPN, as OpenSSL-based servers without a
match do). Twisted's selector answers "no overlap" with an empty name, which OpenSSL turns into an
internal_error alert; ``_select_alpn`` replaces it.

TLS versions: TLS 1.2 and 1.3 unless the persona caps them (``identity['tls_max_version']``:
'1.2'). OpenSSL sends TLS 1.3 NewSessionTicket messages after the handshake and pyOpenSSL cannot
turn them off (no SSL_CTX_set_num_tickets binding); CUPS 2.4 clients (GnuTLS, with a timeout, as
``ipptool -T`` and the ipp backend run) read such a ticket as a 0-byte response and reconnect in
a loop. Listeners serving CUPS clients (IPPS) cap at TLS 1.2, where no ticket is sent
(Twisted sets SSL_OP_NO_TICKET).
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IProtocolNegotiationFactory
from twisted.protocols.tls import TLSMemoryBIOFactory

from .base import Listener, Persona, ProbeTarget
from .serving import LISTEN_BACKLOG

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\s*", re.S)
# persona identity['tls_max_version'] -> the highest version a server negotiates
MAX_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": None}   # None: what OpenSSL offers


class TLSMaterialMissing(ValueError):
    """A TLS listener or probe without the certificate files it needs."""


def _server_protocols(connection: SSL.Connection) -> tuple[bytes, ...]:
    """The ALPN names the application behind ``connection`` speaks (an HTTP Site: h2?, http/1.1)."""
    tls_protocol = connection.get_app_data()
    factory = getattr(getattr(tls_protocol, "factory", None), "wrappedFactory", None)
    negotiation = IProtocolNegotiationFactory(factory, None)
    return tuple(negotiation.acceptableProtocols()) if negotiation is not None else ()


def _select_alpn(connection: SSL.Connection, offered: list[bytes]):
    """Our first protocol the client offered, or no ALPN at all: never a failed handshake."""
    try:
        ours = _server_protocols(connection)
    except Exception:   # a callback exception would become an internal_error alert
        ours = ()
    return next((name for name in ours if name in offered), SSL.NO_OVERLAPPING_PROTOCOLS)


@lru_cache(maxsize=None)
def _server_options(cert_file: str, key_file: str, max_version: str = "1.3") -> ssl.CertificateOptions:
    pem = Path(cert_file).read_bytes() + b"\n" + Path(key_file).read_bytes()
    chain = [ssl.Certificate.loadPEM(m.group(0)).original for m in _PEM_CERT.finditer(pem)][1:]
    private = ssl.PrivateCertificate.loadPEM(pem)
    options = ssl.CertificateOptions(privateKey=private.privateKey.original, certificate=private.original,
                                     extraCertChain=chain or None,
                                     lowerMaximumSecurityTo=MAX_VERSIONS[max_version])
    # getContext() builds the context once and keeps it: every connection uses this selector.
    options.getContext().set_alpn_select_callback(_select_alpn)
    return options


def warm() -> None:
    """Initialise OpenSSL and Twisted's TLS plumbing with a throwaway certificate, server and client
    side: in the zygote, before it forks, so no daemon builds (and copies) them again."""
    from cryptography.hazmat.primitives import serialization

    from emulator.pki import LabCA

    ca = LabCA()
    cert, key = ca.issue("warm", "127.0.0.1")
    pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    private = ssl.PrivateCertificate.loadPEM(pem)
    ssl.CertificateOptions(privateKey=private.privateKey.original, certificate=private.original).getContext()
    trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(ca.cert.public_bytes(serialization.Encoding.PEM))])
    ssl.optionsForClientTLS("warm", trustRoot=trust)


def server_options(persona: Persona) -> ssl.CertificateOptions:
    if not (persona.cert_file and persona.key_file):
        raise TLSMaterialMissing(f"{persona.host}: a TLS listener needs persona cert_file and key_file")
    max_version = str(persona.identity.get("tls_max_version") or "1.3")
    if max_version not in MAX_VERSIONS:
        raise ValueError(f"{persona.host}: identity tls_max_version must be one of "
                         f"{', '.join(MAX_VERSIONS)}, got {max_version!r}")
    return _server_options(persona.cert_file, persona.key_file, max_version)


def listen_tls(reactor, port: int, factory, persona: Persona, interface: str = ""):
    # TLSMemoryBIOFactory with clock=reactor rather than listenSSL: listenSSL buffers small writes
    # on the global reactor's clock, so on any other (injected, test) reactor they never flush.
    wrapped = TLSMemoryBIOFactory(server_options(persona), False, factory, clock=reactor)
    return reactor.listenTCP(port, wrapped, backlog=LISTEN_BACKLOG, interface=interface)


def listen_stream(reactor, listener: Listener, factory, persona: Persona, interface: str = ""):
    """Listen on ``listener``'s TCP port: implicit TLS when its security is 'tls', else plain TCP."""
    if listener.security == "tls":
        return listen_tls(reactor, listener.port, factory, persona, interface=interface)
    return reactor.listenTCP(listener.port, factory, backlog=LISTEN_BACKLOG, interface=interface)


def trust_root(ca_file: str):
    certs = [ssl.Certificate.loadPEM(m.group(0)) for m in _PEM_CERT.finditer(Path(ca_file).read_bytes())]
    if not certs:
        raise TLSMaterialMissing(f"{ca_file} holds no PEM certificate")
    return ssl.trustRootFromCertificates(certs)


def client_creator(target: ProbeTarget):
    """Client TLS that verifies the chain (target.ca_file) and the host name (target.server_name)."""
    if not target.ca_file:
        raise TLSMaterialMissing("a TLS probe needs target.ca_file to verify the server")
    name = target.server_name or target.host
    ca = Path(target.ca_file).stat()
    return _client_options(name, target.ca_file, ca.st_mtime_ns, ca.st_size)


@lru_cache(maxsize=1024)
def _client_options(name: str, ca_file: str, _mtime_ns: int, _size: int):
    # One per server name and CA file (as it is now), not one per probe: building it parses the
    # bundle and sets up an OpenSSL context. Each connection still makes a full handshake.
    return ssl.optionsForClientTLS(name, trustRoot=trust_root(ca_file))


def connect_tls(reactor, target: ProbeTarget, factory, timeout: float | None = None):
    wrapped = TLSMemoryBIOFactory(client_creator(target), True, factory, clock=reactor)
    return reactor.connectTCP(target.host, target.port, wrapped,
                              timeout=timeout if timeout is not None else target.timeout)


def describe_failure(failure) -> str:
    """'certificate: ...' for verification failures, so reports say what was wrong with TLS."""
    text = failure.getErrorMessage()
    if "certificate" in text.lower() or "verify" in text.lower() or "hostname" in text.lower():
        return f"certificate: {text}"
    return f"tls: {text}"
