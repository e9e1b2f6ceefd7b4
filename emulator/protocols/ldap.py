"""``ldap``: LDAPv3 (RFC 4511) directory stub and probe: simple bind, search,
LDAPS (implicit TLS) and StartTLS (RFC 4511 §4.14, OID 1.3.6.1.4.1.1466.20037).

SafeQ's embedded terminals (Xerox, Toshiba, OKI, ...) ask the Terminal Server's
LDAP port for a user's roles and permission groups; the LDAP Replicator and
Management bind to the customer's LDAP server to read users. The stub is
ldaptor's ``LDAPServer`` over the read-only in-memory lab directory in
``ldap_directory.ldif`` (base ``dc=safeq,dc=lab``), so real clients
(``ldapsearch``, the Java stacks of the terminals) get real LDAP answers.

Server
    ``security``: ``plain`` LDAP only (StartTLS answered with protocolError,
    as by a server without TLS); ``tls`` LDAPS; ``starttls`` StartTLS offered
    and *required*: a bind with credentials or a search before it gets
    confidentialityRequired (13), like a directory configured for "LDAP over
    STARTTLS"; ``optional`` StartTLS offered (when the persona has a
    certificate), plaintext accepted too. Only simple binds, checked
    against ``userPassword`` (an anonymous bind is accepted, even before
    StartTLS: it carries no secret); searches need a bound user (like Active
    Directory), except the root DSE (RFC 4512 §5.1: base '' scope base, filter
    (objectClass=*) in any case; namingContexts, supportedLDAPVersion 3,
    supportedExtension StartTLS where offered, vendorName; only the requested
    attributes, all for none/'*'/'+'; no supportedSASLMechanisms: only simple
    binds), which anyone may read; ``userPassword`` is never returned;
    writes get unwillingToPerform. A successful bind's diagnosticMessage says
    ``safeq-lab <host> (<roles>): bound <dn>; peer=<client IP>``: the probe's
    proof of who answered and whom it saw. Malformed BER (wrong tag, bad or
    oversized length, undecodable message, a response or message id 0 from a
    client) gets RFC 4511's Notice of Disconnection and a close; other
    connections go on. ``on_request`` gets one record per bind, search and
    StartTLS, successful or not. ``persona.identity['ldap_directory']`` may
    name another LDIF file; ``identity['vendor']`` is the root DSE's vendorName.

Probe
    Connect (LDAPS: TLS verifying the chain against ``target.ca_file`` and the
    name ``target.server_name``; ``starttls``: StartTLS first, then the same
    verification), simple bind as a lab user, search, unbind. The default
    request is the terminals': bind as ``uid=alice`` and search ``ou=groups``
    for ``(member=<her DN>)``, expecting print-users and scan-users. Query
    'users' (the LDAP Replicator's) binds with the replicator's service account
    and reads the users. ``target.options``: ``query`` ('groups' | 'users'),
    ``user`` (uid or DN), ``password``, ``base``, ``expect`` (names that must
    come back).

ldaptor's in-memory tree (``ldaptor.inmemory``) imports ldaptor's LDAP client,
which imports the *global* Twisted reactor: it is imported on the first
``listen()``, after the process entry point installed its reactor, never at
module import (``roled`` imports this module before it installs the asyncio
reactor). The probe only needs ldaptor's codec (``pureldap``), which is
reactor-free.
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from ldaptor.interfaces import IConnectedLDAPEntry
from ldaptor.protocols import pureber, pureldap
from ldaptor.protocols.ldap import distinguishedname, ldaperrors
from ldaptor.protocols.ldap.ldapserver import LDAPServer
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IHandshakeListener, IListeningPort, ISSLTransport
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from . import tls
from .base import Listener, Persona, ProbeResult, ProbeTarget
from .serving import LISTEN_BACKLOG
from .probing import (OnRequest, ProbeClientFactory, StreamVerdict, connect_timeout,
                      error_result, no_connection_detail, report)

PROTOCOL_IDS = ('ldap',)

STARTTLS_OID = pureldap.LDAPStartTLSRequest.oid                 # 1.3.6.1.4.1.1466.20037
NOTICE_OF_DISCONNECTION_OID = b'1.3.6.1.4.1.1466.20036'        # RFC 4511 §4.4.1

DIRECTORY_FILE = Path(__file__).with_name('ldap_directory.ldif')
BASE_DN = 'dc=safeq,dc=lab'
PEOPLE_DN = f'ou=people,{BASE_DN}'
GROUPS_DN = f'ou=groups,{BASE_DN}'
# Lab credentials (ldap_directory.ldif): the terminals' user and the replicator's service account.
LAB_USER = 'alice'
LAB_PASSWORD = 'alice-lab-pw'
LAB_GROUPS = ('print-users', 'scan-users')
REPLICATOR_DN = f'uid=safeq-replicator,ou=services,{BASE_DN}'
REPLICATOR_PASSWORD = 'replicator-lab-pw'

MAX_MESSAGE = 1 << 20        # largest LDAPMessage either side accepts
IDLE_TIMEOUT = 120.0         # seconds the stub keeps a silent connection


# --- codec (shared by server and client) -----------------------------------
_log = Logger()


class LDAPWireError(ValueError):
    """Bytes that are not a well-formed LDAPMessage."""


_DECODER = pureldap.LDAPBERDecoderContext_TopLevel(
    inherit=pureldap.LDAPBERDecoderContext_LDAPMessage(
        fallback=pureldap.LDAPBERDecoderContext(fallback=pureber.BERDecoderContext()),
        inherit=pureldap.LDAPBERDecoderContext(fallback=pureber.BERDecoderContext())))


def decode_message(buffer: bytes, limit: int = MAX_MESSAGE) -> tuple[pureldap.LDAPMessage, int] | None:
    """The first LDAPMessage in ``buffer`` and the bytes it used; None while incomplete.

    Raises LDAPWireError as soon as the bytes cannot become a valid message,
    so a peer cannot make us buffer garbage or a huge announced length.
    """
    if not buffer:
        return None
    if buffer[0] != 0x30:
        raise LDAPWireError(f'not an LDAPMessage: tag 0x{buffer[0]:02x}, expected 0x30 (SEQUENCE)')
    if len(buffer) < 2:
        return None
    first = buffer[1]
    if first < 0x80:
        length, header = first, 2
    elif first == 0x80:
        raise LDAPWireError('indefinite BER length (not allowed in LDAP)')
    else:
        size = first & 0x7f
        if size > 4:
            raise LDAPWireError(f'BER length field of {size} bytes')
        if len(buffer) < 2 + size:
            return None
        length, header = int.from_bytes(buffer[2:2 + size], 'big'), 2 + size
    if length > limit:
        raise LDAPWireError(f'message of {length} B exceeds the {limit} B limit')
    total = header + length
    if len(buffer) < total:
        return None
    try:
        # ldaptor prints unknown tags to stdout, which is the daemon's handshake channel.
        with contextlib.redirect_stdout(io.StringIO()):
            message, used = pureber.berDecodeObject(_DECODER, buffer[:total])
    except Exception as exc:  # ldaptor signals bad content with asserts, IndexError, ...
        raise LDAPWireError(f'undecodable LDAPMessage ({type(exc).__name__}: {exc})') from None
    if not isinstance(message, pureldap.LDAPMessage) or used != total or message.value is None:
        raise LDAPWireError('undecodable LDAPMessage (unknown protocol operation)')
    return message, used


def encode_message(op, message_id: int) -> bytes:
    return pureldap.LDAPMessage(op, id=message_id).toWire()


def result_name(code: int) -> str:
    """RFC 4511 name of a resultCode, e.g. 49 -> 'invalidCredentials'."""
    cls = ldaperrors.LDAPExceptionCollection.collection.get(code)
    return cls.name.decode('ascii') if cls is not None and cls.name else f'resultCode {code}'


def _text(value) -> str:
    return value.decode('utf-8', 'replace') if isinstance(value, bytes) else str(value)


def _describe_result(response) -> str:
    text = f'{result_name(response.resultCode)} ({response.resultCode})'
    message = _text(response.errorMessage or b'')
    return f'{text}: {message}' if message else text


# --- directory ------------------------------------------------------------------

@lru_cache(maxsize=None)
def load_directory(path: str = str(DIRECTORY_FILE)):
    """The in-memory tree of an LDIF file (the root entry first, parents before children).

    Cached: stubs never modify it (writes are refused), so listeners share it.
    """
    from ldaptor import inmemory  # imports the global reactor: see the module docstring

    box: list = []
    with open(path, 'rb') as handle:
        try:
            inmemory.fromLDIFFile(handle).addBoth(box.append)  # works synchronously
        except Exception as exc:  # a syntax error raises right from the parser
            box.append(Failure(exc))
    if not box:
        raise ValueError(f'{path}: LDIF did not load synchronously')
    if isinstance(box[0], Failure):
        raise ValueError(f'{path}: bad LDIF: {box[0].getErrorMessage() or box[0].type.__name__}')
    return box[0]


# --- server stub ----------------------------------------------------------------

def _failure_name(failure: Failure) -> str:
    if failure.check(ldaperrors.LDAPException) and failure.value.resultCode is not None:
        return result_name(failure.value.resultCode)
    return 'other'


def _without_secrets(entry: pureldap.LDAPSearchResultEntry) -> pureldap.LDAPSearchResultEntry:
    attributes = [(key, values) for key, values in entry.attributes
                  if _text(key).lower() != 'userpassword']
    return pureldap.LDAPSearchResultEntry(objectName=entry.objectName, attributes=attributes)


_COMPARISONS = ((pureldap.LDAPFilter_equalityMatch, '='), (pureldap.LDAPFilter_greaterOrEqual, '>='),
                (pureldap.LDAPFilter_lessOrEqual, '<='), (pureldap.LDAPFilter_approxMatch, '~='))


def filter_text(search_filter) -> str:
    """RFC 4515 text of a decoded filter, for the request log (ldaptor's asText fails on bytes)."""
    f = search_filter
    try:
        if isinstance(f, (pureldap.LDAPFilter_and, pureldap.LDAPFilter_or)):
            op = '&' if isinstance(f, pureldap.LDAPFilter_and) else '|'
            return f'({op}{"".join(filter_text(item) for item in f)})'
        if isinstance(f, pureldap.LDAPFilter_not):
            return f'(!{filter_text(f.value)})'
        if isinstance(f, pureldap.LDAPFilter_present):
            return f'({_text(f.value)}=*)'
        for kind, op in _COMPARISONS:
            if isinstance(f, kind):
                return f'({_text(f.attributeDesc.value)}{op}{_text(f.assertionValue.value)})'
        if isinstance(f, pureldap.LDAPFilter_substrings):
            parts = {type(part): _text(part.value) for part in f.substrings}
            middle = [_text(part.value) for part in f.substrings
                      if isinstance(part, pureldap.LDAPFilter_substrings_any)]
            return (f'({_text(f.type)}={parts.get(pureldap.LDAPFilter_substrings_initial, "")}*'
                    + ''.join(f'{m}*' for m in middle)
                    + f'{parts.get(pureldap.LDAPFilter_substrings_final, "")})')
    except Exception:
        pass
    return type(f).__name__


_MATCHABLE = (pureldap.LDAPFilter_present, pureldap.LDAPFilter_equalityMatch,
              pureldap.LDAPFilter_greaterOrEqual, pureldap.LDAPFilter_lessOrEqual)


def check_filter(search_filter, depth: int = 0) -> None:
    """Refuse (LDAPException) a filter ldaptor's in-memory matcher cannot evaluate.

    ldaptor raises on approxMatch and extensibleMatch and asserts on substrings out of
    RFC 4511 order, inside a tree walk whose failures escape as unhandled-Deferred
    tracebacks; checked up front, the client gets a result code instead.
    """
    f = search_filter
    if depth > 32:
        raise ldaperrors.LDAPUnwillingToPerform('filter nested too deeply')
    if isinstance(f, (pureldap.LDAPFilter_and, pureldap.LDAPFilter_or)):
        for item in f:
            check_filter(item, depth + 1)
        return
    if isinstance(f, pureldap.LDAPFilter_not):
        check_filter(f.value, depth + 1)
        return
    if isinstance(f, _MATCHABLE):
        return
    if isinstance(f, pureldap.LDAPFilter_substrings):
        parts = list(f.substrings)
        kinds = [type(part) for part in parts]
        if kinds[:1] == [pureldap.LDAPFilter_substrings_initial]:
            kinds = kinds[1:]
        if kinds[-1:] == [pureldap.LDAPFilter_substrings_final]:
            kinds = kinds[:-1]
        if not parts or any(kind is not pureldap.LDAPFilter_substrings_any for kind in kinds):
            raise ldaperrors.LDAPProtocolError('substrings filter must be initial?, any*, final?')
        return
    raise ldaperrors.LDAPUnwillingToPerform(f'{type(f).__name__} filters are not supported')


def _read_only(*_args, **_kwargs):
    raise ldaperrors.LDAPUnwillingToPerform('the lab directory is read-only')


class LabLDAPServer(LDAPServer, TimeoutMixin):
    """ldaptor's LDAPServer with StartTLS, a strict decoder, access rules and witness records."""

    def __init__(self, factory: LDAPStubFactory) -> None:
        LDAPServer.__init__(self)
        self.factory = factory
        self._closing = False

    def callLater(self, period, func):
        # TimeoutMixin would otherwise use the global reactor.
        return self.factory.reactor.callLater(period, func)

    # connection ---------------------------------------------------------------

    def connectionMade(self) -> None:
        LDAPServer.connectionMade(self)
        self.setTimeout(IDLE_TIMEOUT)

    def connectionLost(self, reason=None) -> None:
        self.setTimeout(None)
        LDAPServer.connectionLost(self, reason)

    def timeoutConnection(self) -> None:
        self.transport.abortConnection()

    @property
    def tls_active(self) -> bool:
        return ISSLTransport.providedBy(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self.resetTimeout()
        self.buffer += data
        while self.buffer and not self._closing:
            try:
                message = self._next_request()
            except LDAPWireError as exc:
                self.disconnect(str(exc))
                return
            if message is None:
                return
            self.handle(message)

    def _next_request(self) -> pureldap.LDAPMessage | None:
        decoded = decode_message(self.buffer)
        if decoded is None:
            return None
        message, used = decoded
        if not isinstance(message.value, pureldap.LDAPProtocolRequest):
            raise LDAPWireError(f'{type(message.value).__name__} is not a request')
        if message.id <= 0:
            raise LDAPWireError(f'message id {message.id} (0 is reserved for the server)')
        self.buffer = self.buffer[used:]
        return message

    def disconnect(self, reason: str) -> None:
        """RFC 4511 §4.4.1 Notice of Disconnection, then close."""
        notice = pureldap.LDAPExtendedResponse(
            resultCode=ldaperrors.LDAPProtocolError.resultCode, errorMessage=reason,
            responseName=NOTICE_OF_DISCONNECTION_OID)
        self.transport.write(encode_message(notice, 0))
        self._closing = True
        self.buffer = b''
        self.setTimeout(None)
        self.transport.loseConnection()

    def _record(self, op: str, **fields: Any) -> None:
        report(self.factory.on_request, {
            'transport': 'tcp', 'port': self.transport.getHost().port,
            'peer': self.transport.getPeer().host, 'op': op, 'tls': self.tls_active, **fields})

    def _require_confidentiality(self) -> None:
        if self.factory.require_tls and not self.tls_active:
            raise ldaperrors.LDAPConfidentialityRequired('this port requires StartTLS first')

    # bind ---------------------------------------------------------------------

    def handle_LDAPBindRequest(self, request, controls, reply):
        dn = _text(request.dn)
        d = maybeDeferred(self._bind, request, controls, reply)

        def bound(response):
            who = dn or 'anonymous'
            persona = self.factory.persona
            response.matchedDN = ''  # ldaptor fills in the user's DN; RFC 4511 leaves it empty
            response.errorMessage = (f'safeq-lab {persona.host} ({",".join(persona.roles) or "-"}): '
                                     f'bound {who}; peer={self.transport.getPeer().host}')
            self._record('bind', dn=dn, result='success')
            return response

        def refused(failure):
            self.boundUser = None  # RFC 4511 §4.2.1: a failed bind leaves the connection anonymous
            self._record('bind', dn=dn, result=_failure_name(failure))
            return failure

        return d.addCallbacks(bound, refused)

    def _bind(self, request, controls, reply):
        if request.dn or request.auth:  # an anonymous bind carries no secret to protect
            self._require_confidentiality()
        if request.sasl:
            raise ldaperrors.LDAPAuthMethodNotSupported('only simple bind is supported')
        try:
            distinguishedname.DistinguishedName(request.dn)
        except Exception:
            raise ldaperrors.LDAPInvalidDNSyntax(_text(request.dn)) from None
        return LDAPServer.handle_LDAPBindRequest(self, request, controls, reply)

    # search -------------------------------------------------------------------

    def _is_root_dse(self, request) -> bool:
        # Attribute names are case-insensitive: ldapsearch's default filter is (objectclass=*).
        search_filter = request.filter
        return (request.baseObject in (b'', '') and request.scope == pureldap.LDAP_SCOPE_baseObject
                and isinstance(search_filter, pureldap.LDAPFilter_present)
                and _text(search_filter.value).lower() == 'objectclass')

    def handle_LDAPSearchRequest(self, request, controls, reply):
        base = _text(request.baseObject)
        entries = 0

        def send(entry):
            nonlocal entries
            entries += 1
            reply(_without_secrets(entry))

        def done(response):
            self._record('search', dn=base, filter=filter_text(request.filter),
                         result=result_name(response.resultCode), entries=entries)
            return response

        def refused(failure):
            self._record('search', dn=base, filter=filter_text(request.filter),
                         result=_failure_name(failure), entries=0)
            return failure

        return maybeDeferred(self._search, request, controls, send).addCallbacks(done, refused)

    def _search(self, request, controls, send):
        if self._is_root_dse(request):  # anyone may read it: clients do before StartTLS and bind
            self.checkControls(controls)
            return self.getRootDSE(request, send)
        self._require_confidentiality()
        if self.boundUser is None:
            raise ldaperrors.LDAPOperationsError('a successful bind must be completed before searching')
        try:
            distinguishedname.DistinguishedName(request.baseObject)
        except Exception:
            raise ldaperrors.LDAPInvalidDNSyntax(_text(request.baseObject)) from None
        check_filter(request.filter)
        return LDAPServer.handle_LDAPSearchRequest(self, request, controls, send)

    def _cbSearchGotBase(self, base, dn, request, reply):
        # ldaptor logs every failure of a search that is not an LDAPException as a critical
        # traceback; a filter it cannot evaluate (approxMatch, extensibleMatch, malformed
        # substrings, ...) is the client's request, not a stub fault: answer with a result code.
        d = maybeDeferred(LDAPServer._cbSearchGotBase, self, base, dn, request, reply)
        return d.addErrback(self._filter_refused, request)

    def _filter_refused(self, failure: Failure, request):
        if failure.check(ldaperrors.LDAPException):
            return failure
        _log.info('LDAP search from {peer} refused: {why}: {detail}', peer=self.transport.getPeer().host,
                  why=failure.type.__name__, detail=failure.getErrorMessage()[:120])
        raise ldaperrors.LDAPUnwillingToPerform(f'filter {filter_text(request.filter)} not supported')

    def getRootDSE(self, request, reply):
        """RFC 4512 §5.1 root DSE: the requested attributes, all of them for none, '*' or '+'.

        No supportedSASLMechanisms: only simple binds are served, and an attribute without
        values cannot be sent."""
        root = IConnectedLDAPEntry(self.factory)
        attributes = [('objectClass', ['top']), ('namingContexts', [root.dn.getText()]),
                      ('supportedLDAPVersion', ['3'])]
        if self.factory.tls_options is not None:
            attributes.append(('supportedExtension', [STARTTLS_OID]))
        attributes.append(('vendorName', [str(self.factory.persona.identity.get('vendor') or 'safeq-lab')]))
        wanted = {_text(name).lower() for name in request.attributes or ()}
        if wanted and not wanted & {'*', '+'}:
            attributes = [(name, values) for name, values in attributes if name.lower() in wanted]
        if request.typesOnly:
            attributes = [(name, []) for name, _values in attributes]
        reply(pureldap.LDAPSearchResultEntry(objectName='', attributes=attributes))
        return pureldap.LDAPSearchResultDone(resultCode=ldaperrors.Success.resultCode)

    def handle_LDAPCompareRequest(self, request, controls, reply):
        self._require_confidentiality()
        if self.boundUser is None:
            raise ldaperrors.LDAPOperationsError('a successful bind must be completed before comparing')
        return LDAPServer.handle_LDAPCompareRequest(self, request, controls, reply)

    def handle_LDAPAbandonRequest(self, request, controls, reply):
        return None  # answers are immediate: nothing to abandon, and abandon has no response

    # StartTLS -----------------------------------------------------------------

    def extendedRequest_startTLS(self, value, reply):
        try:
            if self.tls_active:
                raise ldaperrors.LDAPOperationsError('TLS is already established')
            if self.factory.tls_options is None:
                raise ldaperrors.LDAPProtocolError('StartTLS is not offered on this port')
        except ldaperrors.LDAPException as exc:
            self._record('starttls', result=result_name(exc.resultCode))
            raise
        # The response goes out in clear text, then the handshake (RFC 4511 §4.14.2).
        reply(pureldap.LDAPStartTLSResponse(resultCode=ldaperrors.Success.resultCode,
                                            responseName=STARTTLS_OID))
        self._record('starttls', result='success')
        self.transport.startTLS(self.factory.tls_options)
        return None

    extendedRequest_startTLS.oid = STARTTLS_OID

    # writes: the lab directory is shared and read-only -------------------------

    handle_LDAPAddRequest = handle_LDAPDelRequest = _read_only
    handle_LDAPModifyRequest = handle_LDAPModifyDNRequest = _read_only

    def extendedRequest_LDAPPasswordModifyRequest(self, data, reply):
        _read_only()

    extendedRequest_LDAPPasswordModifyRequest.oid = pureldap.LDAPPasswordModifyRequest.oid


class LDAPStubFactory(ServerFactory):
    noisy = False

    def __init__(self, reactor, persona: Persona, root, *, require_tls: bool = False,
                 tls_options=None, on_request: OnRequest | None = None) -> None:
        self.reactor = reactor
        self.persona = persona
        self.root = root
        self.require_tls = require_tls
        self.tls_options = tls_options  # set where StartTLS is offered
        self.on_request = on_request

    def __conform__(self, interface):
        # ldaptor's server finds its tree as IConnectedLDAPEntry(factory); this
        # avoids registering a process-wide adapter.
        if interface is IConnectedLDAPEntry:
            return self.root
        return None

    def buildProtocol(self, addr) -> LabLDAPServer:
        return LabLDAPServer(self)


def stub_factory(reactor, listener: Listener, persona: Persona,
                 on_request: OnRequest | None = None) -> LDAPStubFactory:
    """The stub's protocol factory for ``listener`` (``listen`` binds it)."""
    root = load_directory(persona.identity.get('ldap_directory') or str(DIRECTORY_FILE))
    tls_options = None
    if listener.security == 'starttls' or (
            listener.security == 'optional' and persona.cert_file and persona.key_file):
        tls_options = tls.server_options(persona)  # TLSMaterialMissing for starttls without a cert
    return LDAPStubFactory(reactor, persona, root, tls_options=tls_options, on_request=on_request,
                           require_tls=listener.security in ('tls', 'starttls'))


def listen(reactor, listener: Listener, persona: Persona, on_request: OnRequest | None = None,
           interface: str = '') -> IListeningPort:
    """Serve the lab directory on ``listener``; bind errors (CannotListenError) propagate."""
    if listener.transport != 'tcp':
        raise ValueError(f'ldap cannot listen on {listener.transport!r} (LDAP runs over TCP)')
    factory = stub_factory(reactor, listener, persona, on_request)
    if listener.security == 'tls':
        return tls.listen_tls(reactor, listener.port, factory, persona, interface=interface)
    return reactor.listenTCP(listener.port, factory, backlog=LISTEN_BACKLOG, interface=interface)


# --- client probe -------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """What one probe asks: bind as ``dn``, search, and the names that must come back."""

    query: str            # 'groups' | 'users'
    dn: str
    password: str
    base: str
    search_filter: Any    # a pureldap filter
    attributes: tuple[str, ...]
    name_attribute: str   # the attribute naming each result ('cn' of a group, 'uid' of a user)
    expect: tuple[str, ...]


def _equality(attribute: str, value: str):
    return pureldap.LDAPFilter_equalityMatch(
        attributeDesc=pureldap.LDAPAttributeDescription(value=attribute),
        assertionValue=pureldap.LDAPAssertionValue(value=value))


def plan_for(target: ProbeTarget) -> Plan:
    """The request for ``target``'s flow and options; ValueError for unusable options."""
    options = target.options
    for key in ('query', 'user', 'password', 'base'):
        if key in options and not isinstance(options[key], str):
            raise ValueError(f'options.{key} must be a string, got {options[key]!r}')
    expect_option = options.get('expect')
    if expect_option is not None and (not isinstance(expect_option, list)
                                      or not all(isinstance(n, str) for n in expect_option)):
        raise ValueError(f'options.expect must be a list of names, got {expect_option!r}')
    query = options.get('query') or 'groups'
    if query == 'groups':
        user, password, expect = LAB_USER, LAB_PASSWORD, LAB_GROUPS
    elif query == 'users':
        user, password, expect = REPLICATOR_DN, REPLICATOR_PASSWORD, (LAB_USER,)
    else:
        raise ValueError(f"options.query must be 'groups' or 'users', got {query!r}")
    if 'user' in options and options['user'] != user:
        user, password, expect = options['user'], '', ()  # someone else: their own password and groups
    password = options.get('password', password)
    expect = tuple(expect_option) if expect_option is not None else expect
    dn = user if '=' in user else f'uid={user},{PEOPLE_DN}'
    if query == 'groups':
        return Plan(query, dn, password, options.get('base', GROUPS_DN), _equality('member', dn),
                    ('cn',), 'cn', expect)
    return Plan(query, dn, password, options.get('base', PEOPLE_DN),
                _equality('objectClass', 'inetOrgPerson'), ('uid', 'cn', 'mail'), 'uid', expect)


_WELCOME = re.compile(r'^safeq-lab (?P<host>\S+) \((?P<roles>[^)]*)\): .*; peer=(?P<peer>\S+)$')


@implementer(IHandshakeListener)
class _LDAPProbeClient(Protocol):
    def __init__(self, exchange: _Exchange) -> None:
        self.exchange = exchange
        self.buffer = b''
        self._next_id = 0

    def send(self, op) -> int:
        self._next_id += 1
        self.transport.write(encode_message(op, self._next_id))
        return self._next_id

    def connectionMade(self) -> None:
        if self.exchange.connected(self):
            self.exchange.begin()

    def handshakeCompleted(self) -> None:
        self.exchange.tls_ready()

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while self.exchange.result is None:
            try:
                decoded = decode_message(self.buffer)
            except LDAPWireError as exc:
                self.exchange.decide('protocol_error', f'bad LDAP reply: {exc}')
                return
            if decoded is None:
                return
            message, used = decoded
            self.buffer = self.buffer[used:]
            self.exchange.message(message)

    def connectionLost(self, reason) -> None:
        self.exchange.lost(reason)


_WAITING_FOR = {'tls': 'TLS handshake', 'starttls': 'StartTLS response', 'bind': 'bind response',
                'search': 'search result'}


class _Exchange(StreamVerdict):
    """One probe: connect, [TLS | StartTLS + TLS], bind, search, unbind.

    ``done`` fires once the verdict is known *and* the socket is closed.
    """

    protocol: _LDAPProbeClient | None

    def __init__(self, reactor, target: ProbeTarget) -> None:
        super().__init__(reactor, target)
        self.plan: Plan | None = None
        self.stage = 'connect'
        self.pending: int | None = None
        self.found: list[str] = []
        self.welcome = None
        self._creator = None

    def describe(self, outcome: str) -> str:
        """The exchange attempted, e.g. 'LDAP StartTLS + bind uid=alice + search groups → 2 groups'."""
        first = {'tls': 'LDAPS', 'starttls': 'LDAP StartTLS +'}.get(self.target.security, 'LDAP')
        if self.plan is None:
            return first
        user = self.plan.dn.split(',', 1)[0]
        text = f'{first} bind {user} + search {self.plan.query}'
        if outcome == 'ok':
            text += f' → {len(self.found)} {self.plan.query}'
        return text

    def start(self) -> Deferred[ProbeResult]:
        try:
            self.plan = plan_for(self.target)
            if self.target.security in ('tls', 'starttls'):
                self._creator = tls.client_creator(self.target)
        except (ValueError, OSError) as exc:  # incl. TLSMaterialMissing, an unreadable CA file
            self.decide('error', str(exc))
            return self.done
        return self.launch(self._connect)

    def _connect(self) -> None:
        factory = ProbeClientFactory(self, lambda: _LDAPProbeClient(self))
        if self.target.security == 'tls':
            self._connector = self.reactor.connectSSL(self.target.host, self.target.port, factory,
                                                      self._creator, timeout=connect_timeout(self.target))
        else:
            self._connector = self.reactor.connectTCP(self.target.host, self.target.port, factory,
                                                      timeout=connect_timeout(self.target))

    # events --------------------------------------------------------------------

    def begin(self) -> None:
        """The TCP connection is up: start TLS, StartTLS or the bind."""
        if self.target.security == 'tls':
            self.stage = 'tls'  # connectSSL started the handshake
        elif self.target.security == 'starttls':
            self._send('starttls', pureldap.LDAPStartTLSRequest())
        else:
            self._bind()

    def tls_ready(self) -> None:
        if self.result is None and self.stage == 'tls':
            self._bind()

    def lost(self, reason) -> None:
        self._open = False
        if self.stage == 'tls':
            self.decide('protocol_error', tls.describe_failure(reason))
        else:
            self.decide('protocol_error', f'connection closed while waiting for the '
                                          f'{_WAITING_FOR.get(self.stage, self.stage)}: '
                                          f'{reason.getErrorMessage()}')
        self.fire()

    def message(self, message: pureldap.LDAPMessage) -> None:
        value = message.value
        if message.id == 0:
            name = _text(getattr(value, 'responseName', b'') or b'')
            what = 'notice of disconnection' if name == _text(NOTICE_OF_DISCONNECTION_OID) else \
                'unsolicited notification'
            detail = _describe_result(value) if hasattr(value, 'resultCode') else repr(value)
            self.decide('protocol_error', f'server sent a {what}: {detail}')
            return
        if message.id != self.pending:
            self.decide('protocol_error', f'reply to message id {message.id}, expected {self.pending}')
            return
        handler = getattr(self, f'_on_{self.stage}', None)
        if handler is None:
            self.decide('protocol_error', f'unexpected {type(value).__name__} during {self.stage}')
            return
        handler(value)

    def _expect(self, value, *kinds) -> bool:
        if isinstance(value, kinds):
            return True
        self.decide('protocol_error', f'expected {kinds[0].__name__} for the {self.stage}, '
                                      f'got {type(value).__name__}')
        return False

    def _on_starttls(self, value) -> None:
        if not self._expect(value, pureldap.LDAPExtendedResponse):
            return
        if value.resultCode != ldaperrors.Success.resultCode:
            self.decide('protocol_error', f'StartTLS refused: {_describe_result(value)}')
            return
        self.stage = 'tls'
        self.pending = None
        self.protocol.transport.startTLS(self._creator)

    def _bind(self) -> None:
        self._send('bind', pureldap.LDAPBindRequest(dn=self.plan.dn, auth=self.plan.password))

    def _on_bind(self, value) -> None:
        if not self._expect(value, pureldap.LDAPBindResponse):
            return
        if value.resultCode != ldaperrors.Success.resultCode:
            self.decide('protocol_error', f'bind {self.plan.dn} refused: {_describe_result(value)}')
            return
        self.welcome = _WELCOME.match(_text(value.errorMessage or b''))
        self._send('search', pureldap.LDAPSearchRequest(
            baseObject=self.plan.base, scope=pureldap.LDAP_SCOPE_wholeSubtree,
            filter=self.plan.search_filter, attributes=list(self.plan.attributes), sizeLimit=1000))

    def _on_search(self, value) -> None:
        if isinstance(value, pureldap.LDAPSearchResultEntry):
            self.found.append(self._name_of(value))
            return
        if isinstance(value, pureldap.LDAPSearchResultReference):
            return  # a referral elsewhere: not followed
        if not self._expect(value, pureldap.LDAPSearchResultDone, pureldap.LDAPSearchResultEntry):
            return
        if value.resultCode != ldaperrors.Success.resultCode:
            self.decide('protocol_error', f'search {self.plan.base} failed: {_describe_result(value)}')
            return
        got = {name.lower() for name in self.found}
        missing = [name for name in self.plan.expect if name.lower() not in got]
        listed = ', '.join(sorted(self.found)) or 'none'
        if missing:
            self.decide('protocol_error', f'search {self.plan.base} returned {self.plan.query}: '
                                          f'{listed}; missing {", ".join(missing)}')
            return
        self.protocol.send(pureldap.LDAPUnbindRequest())
        if self.welcome:
            who = f'answered by {self.welcome["host"]} ({self.welcome["roles"]})'
            peer = self.welcome['peer']
        else:
            who, peer = 'answered by an LDAP server that did not say who it is', None
        self.decide('ok', f'{who}; bound {self.plan.dn}; {self.plan.query}: {listed}',
                    peer_seen=peer)

    def _name_of(self, entry) -> str:
        for key, values in entry.attributes:
            if _text(key).lower() == self.plan.name_attribute and values:
                return _text(values[0])
        return _text(entry.objectName).split(',', 1)[0].split('=', 1)[-1]

    def _send(self, stage: str, op) -> None:
        self.stage = stage
        self.pending = self.protocol.send(op)

    # verdict -------------------------------------------------------------------

    def _timeout_detail(self) -> str:
        if not self._made:
            return no_connection_detail(self.target)
        return (f'connected, but no {_WAITING_FOR.get(self.stage, self.stage)} '
                f'within {self.target.timeout:g} s')


def probe(reactor, target: ProbeTarget) -> Deferred[ProbeResult]:
    """Bind and search ``target``'s directory; always fires with a ProbeResult."""
    if target.transport != 'tcp':
        return error_result(target, 'LDAP', f'ldap runs over TCP, not {target.transport}')
    return _Exchange(reactor, target).start()


__all__ = ['PROTOCOL_IDS', 'listen', 'probe', 'load_directory', 'decode_message', 'plan_for']
