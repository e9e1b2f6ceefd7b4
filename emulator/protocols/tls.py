"""TLS plumbing shared by every protocol module: server options from a persona, verifying clients.

Servers present the host's certificate (issued by the lab CA, or the customer's); clients verify
the chain against the target's CA bundle and the host name, as a real SafeQ component should.

ALPN: a server picks the first protocol of its own list that the client offers, or none at all
when there is no overlap (the handshake goes on without ALPN, as OpenSSL-based servers without a
match do). Twisted's selector answers "no overlap" with an empty name, which OpenSSL turns into an
internal_error alert; ``_select_alpn`` replaces it.

Certificate swap: every server context built from a persona's certificate is registered, so
``swap_certificate`` makes all TLS listeners of the host (implicit TLS and STARTTLS alike) present
another certificate to new connections, without a restart (a scenario's expired certificate).
A client whose verification fails says why (``CertificateRejected``: expired, not yet valid, or
not issued by a CA it trusts), not only OpenSSL's "certificate verify failed".

TLS versions: TLS 1.2 and 1.3 unless the persona caps them (``identity['tls_max_version']``:
'1.2'). OpenSSL sends TLS 1.3 NewSessionTicket messages after the handshake and pyOpenSSL cannot
turn them off (no SSL_CTX_set_num_tickets binding); CUPS 2.4 clients (GnuTLS, with a timeout, as
``ipptool -T`` and the ipp backend run) read such a ticket as a 0-byte response and reconnect in
a loop. Listeners serving CUPS clients (IPPS) cap at TLS 1.2, where no ticket is sent
(Twisted sets SSL_OP_NO_TICKET).
"""
from __future__ import annotations

import datetime
import re
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

from cryptography import x509
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.error import VerifyError
from twisted.internet.interfaces import (IOpenSSLClientConnectionCreator, IOpenSSLContextFactory,
                                         IProtocolNegotiationFactory)
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from emulator.pki import common_name, issued_by

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


def _certificate_options(cert_file: str, key_file: str, max_version: str) -> ssl.CertificateOptions:
    pem = Path(cert_file).read_bytes() + b"\n" + Path(key_file).read_bytes()
    chain = [ssl.Certificate.loadPEM(m.group(0)).original for m in _PEM_CERT.finditer(pem)][1:]
    private = ssl.PrivateCertificate.loadPEM(pem)
    options = ssl.CertificateOptions(privateKey=private.privateKey.original, certificate=private.original,
                                     extraCertChain=chain or None,
                                     lowerMaximumSecurityTo=MAX_VERSIONS[max_version])
    # getContext() builds the context once (checking that key and certificate match) and keeps it:
    # every connection uses this selector.
    options.getContext().set_alpn_select_callback(_select_alpn)
    return options


@implementer(IOpenSSLContextFactory)
class SwappableServerOptions:
    """A server's TLS options whose certificate can be swapped while it listens: each new connection
    takes the context of the pair in force (Twisted asks getContext() per connection). pyOpenSSL
    refuses to change a context once used, so a swap builds a new one."""

    def __init__(self, cert_file: str, key_file: str, max_version: str) -> None:
        self.max_version = max_version
        self.options = _certificate_options(cert_file, key_file, max_version)

    def use(self, cert_file: str, key_file: str) -> None:
        self.options = _certificate_options(cert_file, key_file, self.max_version)

    def getContext(self) -> SSL.Context:
        return self.options.getContext()


@lru_cache(maxsize=None)
def _server_options(cert_file: str, key_file: str, max_version: str = "1.3") -> SwappableServerOptions:
    options = SwappableServerOptions(cert_file, key_file, max_version)
    serve_swappable(cert_file, key_file, options.use)
    return options


# -- certificate swap: the persona's (cert_file, key_file) -> how each server context built from it
# is made to present another pair, so one swap reaches every TLS listener of the host.
_swappable: dict[tuple[str, str], list[Callable[[str, str], None]]] = {}
_swapped: dict[tuple[str, str], tuple[str, str]] = {}   # the persona's pair -> the pair served instead


def serve_swappable(cert_file: str, key_file: str, use: Callable[[str, str], None]) -> None:
    """Register a server context built from (cert_file, key_file): ``use(cert, key)`` makes it present
    another pair to new connections. One registered after a swap gets the swapped pair at once."""
    _swappable.setdefault((cert_file, key_file), []).append(use)
    if (cert_file, key_file) in _swapped:
        use(*_swapped[(cert_file, key_file)])


def swap_certificate(persona: Persona, cert_file: str, key_file: str) -> int:
    """From now on every TLS listener built from the persona's certificate presents (cert_file,
    key_file) to new connections; open connections keep theirs. The number of server contexts
    switched. ValueError (one line) when the pair is unusable; nothing changes then."""
    try:
        _certificate_options(cert_file, key_file, "1.3")   # the checks every context will make
    except (SSL.Error, OSError, ValueError, VerifyError) as exc:   # VerifyError: the key is another's
        raise ValueError(f"{cert_file} with {key_file}: not a usable certificate and key "
                         f"({' '.join(str(exc).split())})") from None
    pair = (persona.cert_file, persona.key_file)
    _swapped[pair] = (cert_file, key_file)
    users = _swappable.get(pair, [])
    for use in users:
        use(cert_file, key_file)
    return len(users)


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


def server_options(persona: Persona) -> SwappableServerOptions:
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
    return ExplainingClientTLS(ssl.optionsForClientTLS(name, trustRoot=trust_root(ca_file)), ca_file)


class CertificateRejected(SSL.Error):
    """The client rejected the server's certificate, with the reason in words (an SSL.Error, as
    OpenSSL's own 'certificate verify failed' is, so every probe reports it the same way)."""


@implementer(IOpenSSLClientConnectionCreator)
class ExplainingClientTLS:
    """Twisted's verifying client TLS (chain and host name), whose failed verification says why.

    OpenSSL's error names no reason and pyOpenSSL exposes no verify result; when the client sends
    its fatal alert, the certificate the server sent is still at hand, and its dates and issuer
    against the trusted CAs say what was wrong (see ``rejection``)."""

    def __init__(self, options, ca_file: str) -> None:
        self.options, self.ca_file = options, ca_file
        self.trusted = x509.load_pem_x509_certificates(Path(ca_file).read_bytes())

    def clientConnectionForTLS(self, tls_protocol) -> SSL.Connection:
        connection = self.options.clientConnectionForTLS(tls_protocol)
        connection.set_info_callback(self._on_alert)
        return connection

    def _on_alert(self, connection: SSL.Connection, where: int, value: int) -> None:
        if where & SSL.SSL_CB_WRITE_ALERT != SSL.SSL_CB_WRITE_ALERT or value >> 8 != FATAL_ALERT:
            return
        try:
            chain = [c.to_cryptography() for c in connection.get_peer_cert_chain() or ()]
            why = rejection(chain, self.trusted, Path(self.ca_file).name) if chain else None
            if why:
                connection.get_app_data().failVerification(Failure(CertificateRejected(why)))
        except Exception:  # nothing may escape into OpenSSL's callback: OpenSSL's own error then stands
            pass


FATAL_ALERT = 2   # TLS alert level (RFC 8446 6): the high byte of the info callback's value


def rejection(chain: list[x509.Certificate], trusted: list[x509.Certificate], trusted_name: str,
              now: datetime.datetime | None = None) -> str | None:
    """Why a client trusting ``trusted`` rejects a server's ``chain`` (leaf first), in words; None
    when neither its dates nor its issuer are the reason (e.g. only the host name is wrong)."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    leaf = chain[0]
    subject = common_name(leaf.subject)
    if leaf.not_valid_after_utc < now:
        return (f"certificate verify failed: certificate has expired ({subject!r} expired on "
                f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC)")
    if leaf.not_valid_before_utc > now:
        return (f"certificate verify failed: certificate is not yet valid ({subject!r} is valid from "
                f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC)")
    if any(issued_by(leaf, ca) for ca in [*trusted, *chain[1:]]):
        return None
    if leaf.issuer == leaf.subject:
        return (f"certificate verify failed: self-signed certificate {subject!r}, not issued by a CA the client "
                f"trusts ({trusted_name})")
    return (f"certificate verify failed: {subject!r} is issued by {common_name(leaf.issuer)!r}, not by a CA "
            f"the client trusts ({trusted_name})")


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
