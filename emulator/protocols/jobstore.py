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

Where the bytes are: a lab daemon names a spool directory (``spool_in``; roled: ``<host>.spool``
in the run directory, removed with it) and every kept document's bytes go to a file there, so
the daemon's heap holds only its name, size and sha256; ``to_send``/``need_held`` read the file
back for the one hop that passes it on. Without a spool (unit tests, one-off processes) the
bytes stay in memory.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import re
import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
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
    data: bytes | None = None   # the content, when kept in memory (passing it on needs it)
    file: str = ''              # the spool file holding the content instead (see spool_in)

    @property
    def kept(self) -> bool:
        return self.data is not None or bool(self.file)

    def with_content(self) -> Document | None:
        """This entry with its bytes in ``data`` (read from its spool file); None when not kept
        (or its file is gone: evicted meanwhile)."""
        if self.data is not None or not self.file:
            return self if self.data is not None else None
        try:
            return dataclasses.replace(self, data=Path(self.file).read_bytes())
        except OSError:
            return None

    def to_dict(self) -> dict[str, Any]:
        """The entry without its content: what the lab reads."""
        return {'name': self.name, 'kind': self.kind, 'size': self.size, 'sha256': self.sha256,
                'via': self.via, 'peer': self.peer, 'owner': self.owner,
                'metadata_bytes': self.metadata_bytes, 'kept': self.kept}

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


# --- the spool: documents' bytes in files, not in the daemon's heap -------------------------------
_spool: Path | None = None
_spool_files = itertools.count(1)


def spool_in(directory: str | os.PathLike | None) -> None:
    """Keep the bytes of documents kept from now on in files under ``directory`` (created, mode
    0700); None, or a directory that cannot be made: in memory. A lab daemon calls it once."""
    global _spool
    _spool = None
    if directory is not None:
        try:
            Path(directory).mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError:
            return
        _spool = Path(directory)


def spooling() -> bool:
    """Whether kept documents go to a spool directory (a daemon serving several hosts has one)."""
    return _spool is not None


def drop_spool() -> None:
    """Remove the spool directory and every file in it (a daemon stopping)."""
    if _spool is not None:
        shutil.rmtree(_spool, ignore_errors=True)


def spool(data: bytes) -> str:
    """``data`` written to a new file of the spool: its path; '' without a spool (or when the
    file cannot be written), and the caller keeps the bytes in memory."""
    if _spool is None:
        return ''
    path = _spool / f'{next(_spool_files):08d}'
    try:
        with open(path, 'xb') as handle:
            handle.write(data)
    except OSError:
        unspool(str(path))
        return ''
    return str(path)


def spool_copy(path: str) -> str:
    """A copy of the file ``path`` in the spool, made by the kernel (no bytes through the heap):
    its path; '' without a spool or when it cannot be copied."""
    if _spool is None:
        return ''
    copy = str(_spool / f'{next(_spool_files):08d}')
    try:
        shutil.copyfile(path, copy)
    except OSError:
        unspool(copy)
        return ''
    return copy


def unspool(path: str) -> None:
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass


class JobStore:
    """One host's documents, newest last, one per (name, kind): a later arrival replaces it."""

    def __init__(self, max_documents: int = MAX_DOCUMENTS, max_bytes: int = MAX_KEPT_BYTES) -> None:
        self.max_documents, self.max_bytes = max_documents, max_bytes
        self._docs: OrderedDict[tuple[str, str], Document] = OrderedDict()
        self._kept_bytes = 0   # sum of the kept documents' sizes, kept up to date by keep (not summed per keep)
        self._lock = threading.Lock()

    def keep(self, doc: Document) -> Document:
        """Keep ``doc`` (its bytes moved to the spool when there is one); the entry kept."""
        if doc.data is not None:
            file = spool(doc.data)
            if file:
                doc = dataclasses.replace(doc, data=None, file=file)
        with self._lock:
            gone = [self._docs.pop((doc.name, doc.kind), None)]
            self._docs[(doc.name, doc.kind)] = doc
            self._kept_bytes += self._bytes(doc) - self._bytes(gone[0])
            while len(self._docs) > self.max_documents or (self._kept_bytes > self.max_bytes and len(self._docs) > 1):
                gone.append(self._docs.popitem(last=False)[1])
                self._kept_bytes -= self._bytes(gone[-1])
        for old in gone:
            if old is not None:
                unspool(old.file)
        return doc

    def _kept(self) -> int:
        """The kept bytes summed afresh (what ``_kept_bytes`` must equal)."""
        return sum(d.size for d in self._docs.values() if d.kept)

    @staticmethod
    def _bytes(doc: Document | None) -> int:
        return doc.size if doc is not None and doc.kept else 0

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
    """Every document of every host in this process."""
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
        made = document(name, 'created', make())
        store.keep(made)
        return made, ''
    loaded = held.with_content()
    return (loaded, '') if loaded is not None else (None, _no_bytes(holder, held))


def _no_bytes(holder: str, held: Document) -> str:
    if held.file:   # evicted (or removed) between finding it and reading it
        return f'{holder} lost the bytes of {held.name} ({held.size} B): its spool file is gone'
    return f'{holder} holds {held.name} ({held.size} B) without its bytes (over {MAX_DOCUMENT_BYTES} B)'


def need_held(options: dict, kinds: tuple[str, ...], bytes_too: bool = True) -> tuple[Document | None, str]:
    """The holder's newest ``name`` of ``kinds`` (or created there), for hops that only pass
    data on; (None, why) when it holds none (an earlier hop did not bring it), or holds it
    without the bytes ``bytes_too`` asks for."""
    name, holder = carried(options)
    held = store_for(holder).find(name, kinds + ('created',))
    if held is None:
        return None, f'{holder} holds no {name} to pass on (an earlier hop did not bring it)'
    if not bytes_too:
        return held, ''
    loaded = held.with_content()
    return (loaded, '') if loaded is not None else (None, _no_bytes(holder, held))
