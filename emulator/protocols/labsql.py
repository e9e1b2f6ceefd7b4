"""``labsql``: what the ``pgsql`` and ``mssql`` modules share: the lab account, the lab queries
the stubs answer and how they turn a listener into a TCP port. No wire format here: each module
puts rows and errors into its own protocol's messages.

Lab account (invented, documented for people testing by hand)
    ``LAB_USER`` / ``LAB_PASSWORD`` (``safeq`` / ``safeq-lab-pw``), database ``LAB_DATABASE``;
    ``persona.identity['db_accounts']``, a user -> password mapping, replaces it for one server.

Lab queries (invented simplification: no SQL parser)
    A batch is split at ``;`` (no quoting) and each statement, with its white space folded and
    lower-cased, must be ``SELECT <integer>`` or one of the database's own lab queries; text that
    does not start with a word is the database's syntax error, any other statement its
    "not supported" error naming the lab queries.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .base import Listener, Persona, ProbeTarget
from .probing import OnRequest
from .serving import LISTEN_BACKLOG, StubFactory

LAB_USER = 'safeq'
LAB_PASSWORD = 'safeq-lab-pw'
LAB_DATABASE = 'safeq'

_SELECT_INTEGER = re.compile(r'^select (-?\d{1,9})$')
_WORD_FIRST = re.compile(r'^[a-z]+\b')

Answer = TypeVar('Answer')


def accounts(identity: dict[str, Any]) -> dict[str, str]:
    """The user -> password table a database stub accepts logins from."""
    table = identity.get('db_accounts')
    return {str(k): str(v) for k, v in table.items()} if isinstance(table, dict) else {LAB_USER: LAB_PASSWORD}


def login(options: dict[str, Any]) -> tuple[str, str, str]:
    """(user, password, database) a probe logs in with: the lab account unless the options name another."""
    user = str(options.get('user') or LAB_USER)
    password = str(options.get('password', LAB_PASSWORD if user == LAB_USER else ''))
    return user, password, str(options.get('database') or LAB_DATABASE)


def offers_encryption(persona: Persona, security: str) -> bool:
    """A stub offers TLS where the port requires it, or may and the persona has a certificate."""
    return security == 'starttls' or (security == 'optional' and bool(persona.cert_file and persona.key_file))


def wants_encryption(target: ProbeTarget) -> bool:
    """A probe asks for TLS where the port requires it, or offers it and the probe can verify it."""
    return target.security == 'starttls' or (target.security == 'optional' and bool(target.ca_file))


def listen(reactor, listener: Listener, persona: Persona, on_request: OnRequest | None, interface: str, *,
           factory_class: type[StubFactory], name: str, upgrade: str):
    """Listen for a database whose TLS starts in band (``upgrade`` names how): no implicit TLS port.
    The listener is checked before the factory is built: building it loads the TLS material."""
    if listener.transport != 'tcp':
        raise ValueError(f'{name} is a TCP protocol, not {listener.transport}')
    if listener.security == 'tls':
        raise ValueError(f'{name} has no implicit TLS port: use security optional or starttls ({upgrade})')
    factory = factory_class(reactor, persona, on_request, listener.security)
    return reactor.listenTCP(listener.port, factory, backlog=LISTEN_BACKLOG, interface=interface)


def split_statements(sql: str) -> list[str]:
    return [statement for statement in sql.split(';') if statement.strip()]


@dataclass(frozen=True)
class Session:
    """What a lab query may answer from: who asked, where, and who answers."""

    user: str
    database: str
    peer: str
    host: str
    version: str
    spid: int = 0    # SQL Server's session id (@@SPID); PostgreSQL's lab queries name none


class QueryError(Exception):
    """A statement the stub does not answer; ``code`` is the database's own (error number, SQLSTATE)."""

    def __init__(self, code: int | str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


class LabQueries(Generic[Answer]):
    """One database's lab queries: what each answers (whatever its module needs to build the
    reply) and the errors it gives for the rest."""

    def __init__(self, answers: Mapping[str, Answer], integer: Callable[[int], Answer],
                 syntax_error: tuple[int | str, str], unsupported: tuple[int | str, str]) -> None:
        self.answers = answers              # normalised statement -> answer
        self.integer = integer              # the answer to SELECT <integer>
        self.syntax_error = syntax_error    # (code, text with {near}: the statement's start)
        self.unsupported = unsupported      # (code, text)

    def find(self, statement: str) -> Answer:
        text = ' '.join(statement.split()).lower()
        number = _SELECT_INTEGER.match(text)
        if number:
            return self.integer(int(number.group(1)))
        if text in self.answers:
            return self.answers[text]
        if not _WORD_FIRST.match(text):
            code, template = self.syntax_error
            raise QueryError(code, template.format(near=statement.strip()[:20]))
        raise QueryError(*self.unsupported)


__all__ = ['LAB_USER', 'LAB_PASSWORD', 'LAB_DATABASE', 'accounts', 'login', 'offers_encryption', 'wants_encryption', 'listen',
           'split_statements', 'Session', 'QueryError', 'LabQueries']
