"""Evidence, then verdict: what the witnesses of one check said, and the pure `judge` over it.

Three witnesses per check: the client's exchange (a ProbeResult; an exposure knock has none),
the server stub's own request log (which client addresses it saw on that port), and each
filtering node's kernel record on the path (emulator.witness: seen / passed / replied). A lab
fault (a probe that failed for its own reasons, a stub that is down) gets its own verdict and is
never reported as a firewall finding.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from emulator.catalog import Catalog
from emulator.plan import Check, CheckKind
from emulator.protocols.base import Outcome, ProbeResult


class Verdict(StrEnum):
    ALLOWED = "ALLOWED"              # required, passed, client and server agree
    UNENCRYPTED = "UNENCRYPTED"      # required, passed in clear although the flow offers TLS
    BLOCKED = "BLOCKED"              # required, and a firewall's record says it dropped or rejected it
    BROKEN = "BROKEN"                # required, every firewall passed it, the exchange still failed (or NAT)
    EXPOSED = "EXPOSED"              # not required, and every firewall on the path let it through
    CLOSED = "CLOSED"                # not required, and a firewall dropped it
    SAME_SEGMENT = "SAME-SEGMENT"    # no firewall on the path: observed, never graded as firewall evidence
    NO_SERVICE = "NO-SERVICE"        # the server's stub is down: a lab fault
    LAB_ERROR = "LAB-ERROR"          # the probe or a witness failed: a lab fault
    LOCAL = "LOCAL"
    NO_PEER = "NO-PEER"
    NOT_EXERCISED = "NOT-EXERCISED"


PASSED = (Verdict.ALLOWED, Verdict.UNENCRYPTED)
FIREWALL_FINDINGS = (Verdict.BLOCKED, Verdict.BROKEN, Verdict.EXPOSED)
LAB_FAULTS = (Verdict.NO_SERVICE, Verdict.LAB_ERROR)


@dataclass(frozen=True)
class HopRecord:
    """What one filtering node on the path did to the check's traffic."""

    node: str
    hook: str                  # 'forward' (firewall node), 'input' / 'output' (a host's own firewall)
    seen: bool                 # the first packet reached the node's rules
    passed: bool               # ... and left them accepted
    replied: bool | None       # the first reply passed back (None: not recorded, e.g. ICMP)
    data_dropped: tuple = ()   # FTP data connections between the two hosts that the node dropped


@dataclass(frozen=True)
class Evidence:
    probe: ProbeResult | None            # the client's exchange; None for an exposure knock
    hops: tuple[HopRecord, ...]          # in path order
    server_saw: frozenset[str] | None    # client addresses the server stub logged on that port (None: no stub, e.g. ICMP)
    service_up: bool = True              # the server's role daemon was alive after probing
    client_address: str = ""
    encrypted: bool = False              # the exchange ran over TLS
    client_up: bool = True               # the client's daemon (its prober and knocker) was alive after probing
    path_loss: str = ""                  # impaired links on the path that lose packets, in words


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    detail: str = ""
    node: str = ""             # the filtering node whose record decided (for findings)
    direction: str = ""        # 'request' | 'reply' | 'data': which packet that node stopped or let through


def judge(check: Check, evidence: Evidence | None, catalog: Catalog) -> Judgement:
    """The verdict of one check: a pure function of the check and its evidence."""
    if check.kind == CheckKind.LOCAL:
        return Judgement(Verdict.LOCAL, check.detail)
    if check.kind == CheckKind.NO_PEER:
        return Judgement(Verdict.NO_PEER, check.detail)
    if check.kind == CheckKind.NOT_EXERCISABLE:
        return Judgement(Verdict.NOT_EXERCISED, check.detail)
    if evidence is None:
        return Judgement(Verdict.LAB_ERROR, "no evidence was collected for this check")
    if check.kind == CheckKind.EXPOSURE:
        return _judge_exposure(check, evidence)
    return _judge_required(check, evidence, catalog)


def _first_drop(evidence: Evidence) -> HopRecord | None:
    return next((hop for hop in evidence.hops if hop.seen and not hop.passed), None)


def _unrecorded(evidence: Evidence, missing: HopRecord, what: str) -> str:
    """A node saw nothing of a packet: on a path with a lossy link that is the likely reason, so say so."""
    if evidence.path_loss:
        return f"{missing.node} has no record of {what}; {evidence.path_loss}, so it may never have reached {missing.node}"
    return f"{missing.node} has no record of {what}"


def _unseen(evidence: Evidence) -> HopRecord | None:
    """The first node with no record of the packet although every node before it passed it."""
    for hop in evidence.hops:
        if not hop.seen:
            return hop
        if not hop.passed:
            return None
    return None


def knock_dropped(node: str) -> Judgement:
    """An exposure knock dropped by `node`: the verdict of nearly every exposure check, which
    emulator.audit hands out without building evidence for each of tens of thousands."""
    return Judgement(Verdict.CLOSED, f"dropped by {node}", node, "request")


def _judge_exposure(check: Check, evidence: Evidence) -> Judgement:
    drop = _first_drop(evidence)
    if drop is not None:
        return knock_dropped(drop.node)
    missing = _unseen(evidence)
    if missing is not None and not evidence.client_up:
        return Judgement(Verdict.LAB_ERROR, f"the daemon on {check.client_host} is down: its knock was not sent")
    if missing is not None:
        return Judgement(Verdict.LAB_ERROR, _unrecorded(evidence, missing, "the probe packet"))
    last = evidence.hops[-1].node
    return Judgement(Verdict.EXPOSED, f"{check.detail}; let through by {', '.join(h.node for h in evidence.hops)}",
                     last, "request")


def _offers_tls(check: Check, catalog: Catalog) -> bool:
    flow = catalog.flow(check.flow_id)
    return check.endpoint.security != "plain" or any(ep.security != "plain" for ep in flow.endpoints)


def _judge_required(check: Check, evidence: Evidence, catalog: Catalog) -> Judgement:
    probe = evidence.probe
    if probe is None or probe.outcome == Outcome.ERROR:
        return Judgement(Verdict.LAB_ERROR, f"the probe failed: {probe.detail if probe else 'no result'}")
    if not check.filtered:
        return Judgement(Verdict.SAME_SEGMENT, f"no firewall on the path (observed: {probe.outcome})")
    drop = _first_drop(evidence)
    if drop is not None:
        return Judgement(Verdict.BLOCKED, f"{drop.node} dropped the request ({probe.outcome})", drop.node, "request")
    if probe.outcome == Outcome.OK:
        missing = _unseen(evidence)
        if missing is not None:
            return Judgement(Verdict.LAB_ERROR, f"the exchange worked but {missing.node} has no record of it")
        seen = evidence.server_saw
        if probe.peer_seen and evidence.client_address and probe.peer_seen != evidence.client_address:
            return Judgement(Verdict.BROKEN, f"server saw {probe.peer_seen}, not {evidence.client_address} "
                                             "(NAT or proxy in the path)")
        if seen is not None and evidence.client_address not in seen:
            saw = f"only {', '.join(sorted(seen))}" if seen else "nothing"
            return Judgement(Verdict.BROKEN, f"the server's log shows {saw} on this port, not "
                                             f"{evidence.client_address} (NAT, proxy or wrong target)")
        if not evidence.encrypted and _offers_tls(check, catalog):
            return Judgement(Verdict.UNENCRYPTED, "passed in clear although the flow offers TLS")
        return Judgement(Verdict.ALLOWED)
    if not evidence.service_up:
        return Judgement(Verdict.NO_SERVICE, f"the role daemon on {check.server_host} is down ({probe.outcome})")
    if evidence.path_loss and probe.outcome == Outcome.TIMEOUT:
        # no node dropped it (that was judged above): an impaired link, not a rule, may have lost it
        return Judgement(Verdict.LAB_ERROR, f"no answer ({probe.outcome}); {evidence.path_loss}, "
                                            f"so the request or its reply may have been lost there, not filtered")
    for hop in evidence.hops:
        # only an unanswered probe can have lost its reply: a RST or ICMP error did come back
        if hop.passed and hop.replied is False and probe.outcome == Outcome.TIMEOUT:
            return Judgement(Verdict.BLOCKED, f"{hop.node} passed the request but dropped the reply "
                                              f"(a stateless rule?) ({probe.outcome})", hop.node, "reply")
        if hop.data_dropped:
            return Judgement(Verdict.BLOCKED, f"{hop.node} dropped the FTP data channel "
                                              f"({probe.detail or probe.outcome})", hop.node, "data")
    missing = _unseen(evidence)
    if missing is not None:
        return Judgement(Verdict.LAB_ERROR, _unrecorded(evidence, missing, f"the request ({probe.outcome}: {probe.detail})"))
    return Judgement(Verdict.BROKEN, f"every firewall passed it, but {probe.outcome}: {probe.detail}")
