"""The control channel between the lab and a host's role daemon: one JSON line each way, typed.

The daemon runs inside its host's network namespace, so whatever the lab wants sent *from* that
host goes to it as a job on a Unix socket (the daemon's spec names the path):

    ProbeJob  {"targets": [ProbeTarget...], "concurrency": n}  ->  ProbeReply {"results": [ProbeResult...]}
    KnockJob  {"knock": [[address, transport, port]...]}       ->  KnockReply {"knocked": n, "errors": [...]}
    StoreQuery {"store": name}  ('' = all)                      ->  StoreReply {"documents": [Document...]}
    CertificateJob {"certificate": {"cert_file", "key_file"}}  ->  CertificateReply {"contexts": n}
        (every TLS listener of the host presents that pair to new connections; n server contexts switched)
    StopJob {"stop": true}                                      ->  StopReply {"stopped": n}
        (the host's n listeners and its control socket close; its daemon says EXITED for it, and
        ends once every host it serves is stopped)
    anything unusable                                           ->  JobError   {"error": "..."}

Both ends use this module: the lab encodes jobs and decodes replies, `JobServer` (the daemon's
side) decodes jobs and encodes replies.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver

from . import netns
from .knock import Knock, knock, parse_knocks
from .protocols import jobstore
from .prober import DEFAULT_CONCURRENCY, run_probes
from .protocols.base import Persona, ProbeResult, ProbeTarget

MAX_LINE = 64 * 1024 * 1024
MAX_ERRORS = 20  # knock errors a reply carries: the first few say what is wrong


@dataclass(frozen=True)
class ProbeJob:
    targets: tuple[ProbeTarget, ...]
    concurrency: int = DEFAULT_CONCURRENCY

    def to_line(self) -> bytes:
        return _line({"targets": [t.to_dict() for t in self.targets], "concurrency": self.concurrency})


@dataclass(frozen=True)
class KnockJob:
    knocks: tuple[Knock, ...]

    def to_line(self) -> bytes:
        return _line({"knock": [list(k) for k in self.knocks]})


@dataclass(frozen=True)
class StoreQuery:
    """What the daemon's stubs received (and its probes created): its jobstore, one name or all."""
    name: str = ""

    def to_line(self) -> bytes:
        return _line({"store": self.name})


@dataclass(frozen=True)
class StoreReply:
    documents: tuple[jobstore.Document, ...]

    def to_line(self) -> bytes:
        return _line({"documents": [d.to_dict() for d in self.documents]})


@dataclass(frozen=True)
class CertificateJob:
    """Swap the certificate of every TLS listener of the daemon's host, in place (no restart)."""
    cert_file: str
    key_file: str

    def to_line(self) -> bytes:
        return _line({"certificate": {"cert_file": self.cert_file, "key_file": self.key_file}})


@dataclass(frozen=True)
class CertificateReply:
    contexts: int   # server contexts switched: 0 when the host has no TLS listener

    def to_line(self) -> bytes:
        return _line({"contexts": self.contexts})


@dataclass(frozen=True)
class StopJob:
    """Stop serving the daemon's host (a stub down), whatever other hosts its process serves."""

    def to_line(self) -> bytes:
        return _line({"stop": True})


@dataclass(frozen=True)
class StopReply:
    stopped: int   # listeners closed, the control socket's included

    def to_line(self) -> bytes:
        return _line({"stopped": self.stopped})


@dataclass(frozen=True)
class ProbeReply:
    results: tuple[ProbeResult, ...]

    def to_line(self) -> bytes:
        return _line({"results": [r.to_dict() for r in self.results]})


@dataclass(frozen=True)
class KnockReply:
    knocked: int
    errors: tuple[str, ...] = ()

    def to_line(self) -> bytes:
        return _line({"knocked": self.knocked, "errors": list(self.errors[:MAX_ERRORS])})


@dataclass(frozen=True)
class JobError:
    error: str

    def to_line(self) -> bytes:
        return _line({"error": self.error})


Job = ProbeJob | KnockJob | StoreQuery | CertificateJob | StopJob
Reply = ProbeReply | KnockReply | StoreReply | CertificateReply | StopReply | JobError


def _line(data: dict) -> bytes:
    return json.dumps(data).encode() + b"\n"


def _object(line: bytes | str) -> dict:
    try:
        data = json.loads(line)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, RecursionError's kin
        raise ValueError(f"not JSON: {exc}") from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if not isinstance(data, dict):
        raise ValueError(f"a JSON object is expected, not {type(data).__name__}")
    return data


def parse_job(line: bytes | str) -> Job:
    """ValueError (one line) for anything that is not a job."""
    data = _object(line)
    if "knock" in data:
        if not isinstance(data["knock"], list):
            raise ValueError("knock must be a list")
        return KnockJob(tuple(parse_knocks(data["knock"])))
    if "store" in data:
        if not isinstance(data["store"], str):
            raise ValueError("store must be a document name ('' for all)")
        return StoreQuery(data["store"])
    if "stop" in data:
        if data["stop"] is not True:
            raise ValueError("stop must be true")
        return StopJob()
    if "certificate" in data:
        pair = data["certificate"]
        if not isinstance(pair, dict) or not all(isinstance(pair.get(k), str) and pair[k]
                                                 for k in ("cert_file", "key_file")):
            raise ValueError("certificate must be {cert_file: path, key_file: path}")
        return CertificateJob(pair["cert_file"], pair["key_file"])
    if not isinstance(data.get("targets"), list):
        raise ValueError("a job has targets (a list) or knock (a list)")
    targets = []
    for index, item in enumerate(data["targets"]):
        try:
            targets.append(ProbeTarget.from_dict(item))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"target {index}: {exc}") from None
    concurrency = data.get("concurrency", DEFAULT_CONCURRENCY)
    if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
        raise ValueError(f"concurrency must be a whole number of at least 1, got {concurrency!r}")
    return ProbeJob(tuple(targets), concurrency)


def parse_reply(line: bytes | str) -> Reply:
    """A reply, or JobError saying why the line is not one (never raises)."""
    try:
        data = _object(line)
        if "error" in data:
            return JobError(str(data["error"]))
        if "results" in data:
            return ProbeReply(tuple(ProbeResult.from_dict(r) for r in data["results"]))
        if "knocked" in data:
            return KnockReply(int(data["knocked"]), tuple(str(e) for e in data.get("errors", [])))
        if "documents" in data:
            return StoreReply(tuple(jobstore.Document.from_dict(d) for d in data["documents"]))
        if "contexts" in data:
            return CertificateReply(int(data["contexts"]))
        if "stopped" in data:
            return StopReply(int(data["stopped"]))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        return JobError(f"the daemon's answer is unusable: {' '.join(str(exc).split())}")
    return JobError("the daemon's answer is neither results, knocks, documents nor an error")


class JobServer(LineReceiver):
    """The daemon's side: one job per line, one reply line each, in order of completion."""

    MAX_LENGTH = MAX_LINE
    delimiter = b"\n"

    def lineReceived(self, line: bytes) -> None:
        try:
            job = parse_job(line)
        except ValueError as exc:
            self._answer(JobError(" ".join(str(exc).split())))
            return
        if isinstance(job, KnockJob):
            with netns.made_in(self.factory.reactor):  # the knocks leave from this daemon's host
                sent, errors = knock(job.knocks)
            self._answer(KnockReply(sent, tuple(errors)))
            return
        if isinstance(job, StoreQuery):
            persona = self.factory.persona
            documents = (jobstore.store_for(persona.host).documents(job.name) if persona is not None
                         else jobstore.all_documents(job.name))
            self._answer(StoreReply(documents))
            return
        if isinstance(job, StopJob):
            self._stop()
            return
        if isinstance(job, CertificateJob):
            self._answer(self._swap_certificate(job))
            return
        running = run_probes(self.factory.reactor, list(job.targets), job.concurrency)
        running.addCallback(lambda results: self._answer(ProbeReply(tuple(results))))
        running.addErrback(lambda failure: self._answer(JobError(" ".join(failure.getErrorMessage().split()))))

    def _swap_certificate(self, job: CertificateJob) -> Reply:
        from .protocols import tls   # pyOpenSSL only where TLS is served
        persona = self.factory.persona
        if persona is None or not (persona.cert_file and persona.key_file):
            return JobError("this daemon serves no certificate to swap")
        try:
            return CertificateReply(tls.swap_certificate(persona, job.cert_file, job.key_file))
        except ValueError as exc:
            return JobError(str(exc))

    def _stop(self) -> None:
        stop = self.factory.stop
        if stop is None:
            self._answer(JobError("this daemon's host cannot be stopped on its own: stop the daemon"))
            return
        self._answer(StopReply(stop()))

    def _answer(self, reply: Reply) -> None:
        if self.transport is not None and self.transport.connected:
            self.transport.write(reply.to_line())

    def lineLengthExceeded(self, line: bytes) -> None:
        self._answer(JobError("job too large"))
        self.transport.loseConnection()


class JobServerFactory(Factory):
    protocol = JobServer

    def __init__(self, reactor, persona: Persona | None = None, stop: Callable[[], int] | None = None) -> None:
        self.reactor = reactor
        self.persona = persona   # whose TLS listeners a CertificateJob swaps, whose documents a StoreQuery lists
        self.stop = stop         # stops the host's service (StopJob): how many listeners closed
