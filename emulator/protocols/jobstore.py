"""``jobstore``: the documents a role daemon's stubs received (print jobs, accounting entries,
scans, mails) and the ones its probes created, so a workflow can pass them on hop by hop.
No sockets here; the protocol modules call it (like ``mailstore``).

Why: SafeQ's workflows carry data from component to component (a job submitted to FlexiSpooler
is accounted by the Spooler Controller, listed at the terminal and released to the MFD; a scan
goes from the MFD to the Terminal Server, the Workflow Processing System and the mail server).
In the lab each of those components is a stub in some host's daemon, and the data moves only
over the network: a probe given the option ``carries: NAME`` (and ``holder: HOST``, the host it
runs from) sends the document NAME its own daemon holds, or creates it when it holds none, and
the receiving stub keeps it under the same name. The lab reads a daemon's documents with the
control channel's ``StoreQuery`` (emulator/jobs.py).

One store per host (``store_for(host)``): a daemon serves one host, whose stubs (LPD, FTP,
WebDAV, SMTP, framed) and probes share it; tests run several hosts in one process. Bounded:
``MAX_DOCUMENTS`` entries and ``MAX_KEPT_BYTES`` of content, oldest first out; a document over
``MAX_DOCUMENT_BYTES`` is recorded (size and sha256) without its bytes, so it cannot be passed on.
Thread-safe: the FTP stub and probe run in threads.
"""
from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

# what a document is to the host holding it
KINDS = ('created',      # a probe here made it (a user's job, a scan): the workflow's origin
         'print-job',    # a print job a spooler or printer received (LPD)
         'accounting',   # job metadata a Spooler Controller accounted (framed)
         'scan',         # a scanned document received (FTP, WebDAV)
         'mail')         # a mail attachment delivered (SMTP) or fetched by a reader (IMAP)
MAX_DOCUMENTS = 256
MAX_KEPT_BYTES = 32 << 20
MAX_DOCUMENT_BYTES = 16 << 20
NAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$')


@dataclass(frozen=True)
class Document:
    name: str              # the workflow's name for it (a job name, a file's stem)
    kind: str              # one of KINDS
    size: int              # bytes of the document itself
    sha256: str            # of the document itself (for accounting: of the job accounted)
    via: str = ''          # protocol it arrived by ('' = created here)
    peer: str = ''         # address it came from
    owner: str = ''        # the user it belongs to (print jobs)
    metadata_bytes: int = 0   # bytes of job metadata that came with it (accounting)
    data: bytes | None = None   # the content, when kept (passing it on needs it)

    def to_dict(self) -> dict[str, Any]:
        """The entry without its content: what the lab reads."""
        return {'name': self.name, 'kind': self.kind, 'size': self.size, 'sha256': self.sha256,
                'via': self.via, 'peer': self.peer, 'owner': self.owner,
                'metadata_bytes': self.metadata_bytes, 'kept': self.data is not None}

    @classmethod
    def from_dict(cls, data: Any) -> Document:
        """ValueError (one line) for anything that is not an entry of to_dict's shape."""
        if not isinstance(data, dict):
            raise ValueError(f'a document is a JSON object, not {type(data).__name__}')
        text = {k: data.get(k, '') for k in ('name', 'kind', 'sha256', 'via', 'peer', 'owner')}
        numbers = {k: data.get(k, 0) for k in ('size', 'metadata_bytes')}
        if not all(isinstance(v, str) for v in text.values()):
            raise ValueError('document name, kind, sha256, via, peer and owner are strings')
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in numbers.values()):
            raise ValueError('document size and metadata_bytes are whole numbers of bytes')
        if text['kind'] not in KINDS:
            raise ValueError(f'document kind {text["kind"]!r} is not one of {", ".join(KINDS)}')
        return cls(**text, **numbers)


def document(name: str, kind: str, data: bytes, **more: Any) -> Document:
    """An entry for ``data``, keeping the bytes when small enough to pass on."""
    kept = data if len(data) <= MAX_DOCUMENT_BYTES else None
    return Document(name, kind, len(data), hashlib.sha256(data).hexdigest(), data=kept, **more)


def name_of(file_name: str) -> str:
    """A received file's workflow name: its base name without the extension ('/x/scan-1.pdf' -> 'scan-1')."""
    base = file_name.replace('\\', '/').rsplit('/', 1)[-1]
    return base.rsplit('.', 1)[0] if '.' in base[1:] else base


class JobStore:
    """One host's documents, newest last, one per (name, kind): a later arrival replaces it."""

    def __init__(self, max_documents: int = MAX_DOCUMENTS, max_bytes: int = MAX_KEPT_BYTES) -> None:
        self.max_documents, self.max_bytes = max_documents, max_bytes
        self._docs: OrderedDict[tuple[str, str], Document] = OrderedDict()
        self._lock = threading.Lock()

    def keep(self, doc: Document) -> Document:
        with self._lock:
            self._docs.pop((doc.name, doc.kind), None)
            self._docs[(doc.name, doc.kind)] = doc
            while len(self._docs) > self.max_documents or (self._kept() > self.max_bytes and len(self._docs) > 1):
                self._docs.popitem(last=False)
        return doc

    def _kept(self) -> int:
        return sum(len(d.data) for d in self._docs.values() if d.data is not None)

    def find(self, name: str, kinds: tuple[str, ...] = KINDS) -> Document | None:
        """The newest document ``name`` of one of ``kinds``."""
        with self._lock:
            found = [d for d in self._docs.values() if d.name == name and d.kind in kinds]
        return found[-1] if found else None

    def documents(self, name: str = '') -> tuple[Document, ...]:
        with self._lock:
            return tuple(d for d in self._docs.values() if not name or d.name == name)


_STORES: dict[str, JobStore] = {}
_STORES_LOCK = threading.Lock()


def store_for(host: str) -> JobStore:
    with _STORES_LOCK:
        store = _STORES.get(host)
        if store is None:
            store = _STORES[host] = JobStore()
        return store


def all_documents(name: str = '') -> tuple[Document, ...]:
    """Every document of every host in this process (a daemon has one host)."""
    with _STORES_LOCK:
        stores = list(_STORES.values())
    return tuple(d for store in stores for d in store.documents(name))


# --- the probe side: what `carries` asks ------------------------------------------------------

def carried(options: dict) -> tuple[str, str]:
    """(name, holder host) of the probe options ``carries``/``holder``; ('', '') when not asked.
    ValueError naming the fix for a bad name."""
    name = options.get('carries')
    if name is None:
        return '', ''
    if not isinstance(name, str) or not NAME.match(name):
        raise ValueError(f"options['carries'] must be a document name (letters, digits, '.', '_', '-'), "
                         f'got {name!r}')
    holder = options.get('holder')
    if not isinstance(holder, str) or not holder:
        raise ValueError("options['carries'] needs options['holder'], the host the probe runs from")
    return name, holder


def to_send(options: dict, kinds: tuple[str, ...], make) -> tuple[Document | None, str]:
    """The document a probe passes on: (None, '') without ``carries``; the holder's newest
    ``name`` of ``kinds`` (or one it created); else ``make()`` (bytes), kept as 'created' here.
    (None, why) when the holder has it without its bytes."""
    name, holder = carried(options)
    if not name:
        return None, ''
    store = store_for(holder)
    held = store.find(name, kinds + ('created',))
    if held is None:
        return store.keep(document(name, 'created', make())), ''
    if held.data is None:
        return None, f'{holder} holds {name} ({held.size} B) without its bytes (over {MAX_DOCUMENT_BYTES} B)'
    return held, ''


def need_held(options: dict, kinds: tuple[str, ...], bytes_too: bool = True) -> tuple[Document | None, str]:
    """The holder's newest ``name`` of ``kinds`` (or created there), for hops that only pass
    data on; (None, why) when it holds none (an earlier hop did not bring it), or holds it
    without the bytes ``bytes_too`` asks for."""
    name, holder = carried(options)
    held = store_for(holder).find(name, kinds + ('created',))
    if held is None:
        return None, f'{holder} holds no {name} to pass on (an earlier hop did not bring it)'
    if bytes_too and held.data is None:
        return None, f'{holder} holds {name} ({held.size} B) without its bytes (over {MAX_DOCUMENT_BYTES} B)'
    return held, ''
