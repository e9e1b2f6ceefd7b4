"""The audit: run every planned check in a running lab, gather the evidence, judge, attribute.

Phases, each with the firewall's own record (emulator.witness) emptied before it:
1. required flows: every host runs its probes at once (full protocol exchanges);
2. exposure sweep: every host knocks on every port it has no business with (no tracing: tens of
   thousands of packets), then the record says which knocks each node let through;
3. the findings alone run again with the filtering nodes tracing first packets (emulator.trace),
   to name the rule that decided: exposures and dropped requests are knocked again, flows whose
   reply or FTP data channel was dropped probed again. (With `explain_all`, phase 1 is traced
   instead, as passing checks are explained too.)
Verdicts come from `evidence.judge`, a pure function; formatting lives in emulator.report.
"""
from __future__ import annotations

import functools
import gc
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import roles
from emulator import attribution, trace, witness
from emulator.evidence import (FIREWALL_FINDINGS, LAB_FAULTS, PASSED, Evidence, HopRecord, Judgement, Verdict, judge,
                               knock_dropped)
from emulator.pki import LAB_CA_NAME, server_name
from emulator.plan import Check, CheckKind
from emulator.protocols.base import ProbeResult, ProbeTarget
from emulator.rules import Ruleset
from emulator.topology import Topology

PROBE_TIMEOUT = 5.0
DROPPED_TIMEOUT = 0.5  # seconds a probe waits when a knock already showed its first packet dropped
KNOCK_WAIT = 3.0     # seconds the first firewall of each path may take to count every knock
KNOCK_SETTLE = 0.05  # then for the knocks to cross the later firewalls of a path (and reach a capture)
ATTRIBUTE_TIMEOUT = 2.0  # seconds a flow whose reply or data channel was dropped is probed again under tracing
RETRIED = ("silent", "timeout")  # unanswered probes the firewalls passed: probed once more, alone
# What run_audit tells its `progress` callback, in this order, once each: (phase, what it does in words).
AUDIT_PHASES = ("knock", "probe", "sweep", "judge", "attribute")

# Exit status bits of `safeq-lab audit` (4 is bad input, set by the CLI).
EXIT_BLOCKED = 1
EXIT_EXPOSED = 2
EXIT_LAB_FAULT = 8

# SafeQ's proprietary links carry job metadata of 40-60 kB per job (vendor document); print
# jobs are larger. Protocols not named here send their module's own realistic default.
PAYLOAD_SIZES = {"safeq": 48 * 1024, "lpr": 64 * 1024, "raw": 64 * 1024, "ipp": 64 * 1024}


@dataclass(frozen=True)
class FlowVerdict:
    check: Check
    verdict: Verdict
    observed: str = ""      # the probe's outcome; 'knock' for an exposure knock
    exchange: str = ""
    detail: str = ""
    elapsed: float = 0.0
    certificate: str = ""   # 'pre-installed' when the server presented the lab's pre-installed certificate
    node: str = ""          # the filtering node whose record decided a finding
    direction: str = ""     # which packet that node stopped: 'request', 'reply' or 'data'
    rule: str = ""          # the rule (file:line: text, or the chain policy) that decided it
    fix: str = ""           # for a blocked required flow: the rule that would admit it, in the input's format

    @property
    def expected(self) -> str:
        return {CheckKind.REQUIRED: "allow", CheckKind.EXPOSURE: "block"}.get(self.check.kind, "-")

    def to_dict(self) -> dict:
        c, ep = self.check, self.check.endpoint
        return {"check": {"kind": str(c.kind), "flow": c.flow_id, "client": c.client_host, "server": c.server_host,
                          "endpoint": ep.label() if ep else None, "protocol": ep.protocol if ep else None,
                          "variant": c.variant, "path": [e.node for e in c.enforcers]},
                "expected": self.expected, "verdict": str(self.verdict), "observed": self.observed,
                "exchange": self.exchange, "detail": self.detail, "elapsed": round(self.elapsed, 4),
                "certificate": self.certificate, "node": self.node, "rule": self.rule, "fix": self.fix}


@dataclass
class AuditReport:
    topology: str
    rules: str
    verdicts: list[FlowVerdict]
    timings: dict[str, float] = field(default_factory=dict)
    profile: dict = field(default_factory=dict)
    egress_drops: int = 0  # packets to addresses outside the lab that lab nodes dropped during the audit

    @property
    def counts(self) -> Counter:
        return Counter(str(v.verdict) for v in self.verdicts)

    @property
    def exit_status(self) -> int:
        counts = self.counts
        status = EXIT_BLOCKED if counts[Verdict.BLOCKED] or counts[Verdict.BROKEN] else 0
        status |= EXIT_EXPOSED if counts[Verdict.EXPOSED] else 0
        return status | (EXIT_LAB_FAULT if any(counts[v] for v in LAB_FAULTS) else 0)

    def to_dict(self, include_closed: bool = False) -> dict:
        return {"schema": 2, "topology": self.topology, "rules": self.rules, "profile": self.profile,
                "counts": dict(self.counts), "exit_status": self.exit_status, "timings": self.timings,
                "egress_drops": self.egress_drops,
                "verdicts": [v.to_dict() for v in self.verdicts
                             if include_closed or v.verdict != Verdict.CLOSED]}


# -- probing -------------------------------------------------------------------------------------
def probe_targets(checks: list[Check], topology: Topology, timeout: float = PROBE_TIMEOUT,
                  ca_file: str = "", dropped: set[int] = frozenset()) -> dict[str, list[ProbeTarget]]:
    """Each client host's probes; those of `dropped` checks (first packet dropped) wait DROPPED_TIMEOUT."""
    by_host: dict[str, list[ProbeTarget]] = {h.name: [] for h in topology.hosts}
    for index, check in enumerate(checks):
        if check.kind != CheckKind.REQUIRED:
            continue
        ep = check.endpoint
        by_host[check.client_host].append(ProbeTarget(
            id=str(index), host=topology.host(check.server_host).address, transport=ep.transport,
            protocol=ep.protocol, port=ep.port, security=ep.security,
            timeout=min(timeout, DROPPED_TIMEOUT) if index in dropped else timeout,
            size=PAYLOAD_SIZES.get(ep.protocol, 1024),
            server_name=server_name(check.server_host), ca_file=ca_file,
            # what this flow's client asks for: resolved here, from roles/, and nowhere else
            options={**roles.probe_options(check.flow_id or ""), **({"mode": check.variant} if check.variant else {})}))
    return by_host


def knocks_by_host(checks: list[Check], topology: Topology) -> dict[str, list[list]]:
    by_host: dict[str, list[list]] = defaultdict(list)
    for check in checks:
        ep = check.endpoint
        by_host[check.client_host].append([topology.host(check.server_host).address, ep.transport, ep.port])
    return by_host


def _knockable(check: Check) -> bool:
    """A required check whose first packet a knock can stand for: through a filtering node, to a port
    (or a ping)."""
    ep = check.endpoint
    return (check.kind == CheckKind.REQUIRED and bool(check.enforcers) and check.client_host != check.server_host
            and (ep.transport == "icmp" or ep.transport in ("tcp", "udp") and bool(ep.port)))


def _one_knock_each(checks: list[Check]) -> list[Check]:
    """One check per connection: a second datagram from the same socket would not be a new one, and
    the node would never count every knock due."""
    return list({(c.client_host, c.server_host, c.endpoint.transport, c.endpoint.port): c for c in checks}.values())


def _first_packet_dropped(lab, nodes, checks: list[Check], topology: Topology) -> set[int]:
    """Indexes of the required checks whose first packet a filtering node drops, learnt from one knock
    each: their probes need not wait a whole timeout for an answer that cannot come. The probe still
    runs, so its verdict rests on its own packets like any other."""
    knocked = [i for i, c in enumerate(checks) if _knockable(c)]
    if not knocked:
        return set()
    records, complete, _errors = _sweep(lab, nodes, _one_knock_each([checks[i] for i in knocked]), topology, {})
    dropped = set()
    for index in knocked:
        check = checks[index]
        key = (topology.host(check.client_host).address, topology.host(check.server_host).address,
               check.endpoint.transport, check.endpoint.port)
        for enforcer in check.enforcers:
            record = records[enforcer.node]
            fate = record.fate(*key) if key[2] == "icmp" else record.knocked(*key, complete[enforcer.node])
            if fate.dropped:
                dropped.add(index)
            if not fate.passed:
                break
    return dropped


# -- evidence -------------------------------------------------------------------------------------
def _server_witness(request_log: list[dict]) -> dict[tuple[str, str, int], set[str]]:
    saw: dict[tuple[str, str, int], set[str]] = defaultdict(set)
    for record in request_log:
        try:
            saw[(record["host"], record["transport"], int(record["port"]))].add(record["peer"])
        except (KeyError, TypeError, ValueError):
            continue
    return saw


def path_loss(check: Check, topology: Topology, lossy: dict[str, float]) -> str:
    """The impaired links on a check's path that lose packets, in words ('' when none does)."""
    if not lossy:  # the usual lab: nothing to look up for each of tens of thousands of checks
        return ""
    links = {topology.host(check.client_host).zone, topology.host(check.server_host).zone}
    links |= {topology.firewall_node(e.node).wan_link for e in check.enforcers if e.hook == "forward"}
    on_path = sorted(link for link in links if lossy.get(link))
    return ", ".join(f"the {link} link loses {lossy[link]:g} % of packets" for link in on_path)


def evidence_for(check: Check, topology: Topology, result: ProbeResult | None,
                 records: dict[str, witness.FirewallRecord], saw, dead: dict[str, str],
                 complete: dict[str, bool] | None = None, lossy: dict[str, float] | None = None) -> Evidence:
    """`complete` (exposure knocks): per node, whether it counted every knock expected to reach it;
    `lossy`: link -> loss percent of the lab's impaired links."""
    ep = check.endpoint
    src, dst = topology.host(check.client_host).address, topology.host(check.server_host).address
    hops = []
    for enforcer in check.enforcers:
        record = records.get(enforcer.node) or witness.FirewallRecord(enforcer.node)
        if complete is not None:  # a knock from a dead daemon was never sent: no node can have seen it
            sent = check.client_host not in dead
            fate = record.knocked(src, dst, ep.transport, ep.port, sent and complete.get(enforcer.node, False))
        else:
            fate = record.fate(src, dst, ep.transport, ep.port)
        data = ()
        if ep.protocol == "ftp" and check.kind == CheckKind.REQUIRED:
            data = tuple(k for k in record.dropped_between(src, dst) if k[3] != ep.port)
        hops.append(HopRecord(enforcer.node, enforcer.hook, fate.seen, fate.passed, fate.replied, data))
    server_saw = None
    if check.kind == CheckKind.REQUIRED and ep.transport != "icmp":
        server_saw = frozenset(saw.get((check.server_host, ep.transport, ep.port), ()))
    return Evidence(result, tuple(hops), server_saw, check.server_host not in dead, src,
                    encrypted=bool(result and result.tls_issuer), client_up=check.client_host not in dead,
                    path_loss=path_loss(check, topology, lossy or {}))


def exposure_verdict(check: Check, topology: Topology, sweep: dict[str, witness.FirewallRecord], saw,
                     dead: dict[str, str], complete: dict[str, bool], lossy: dict[str, float],
                     catalog) -> FlowVerdict:
    """An exposure knock's verdict. Nearly all of tens of thousands are dropped by the first node of
    their path, which its record says at once: that case is read straight off it, exactly as `judge`
    would decide from the whole evidence (tests/unit/test_audit.py compares both), and only the rest
    get their evidence built."""
    first = check.enforcers[0].node if check.enforcers else None
    record = sweep.get(first)
    if record is not None and check.client_host not in dead and complete.get(first, False):
        ep = check.endpoint
        key = (topology.host(check.client_host).address, topology.host(check.server_host).address, ep.transport, ep.port)
        if key not in record.passed:
            return _verdict(check, _knock_dropped(first), None)
    return _verdict(check, judge(check, evidence_for(check, topology, None, sweep, saw, dead, complete, lossy), catalog),
                    None)


@functools.cache
def _knock_dropped(node: str) -> Judgement:
    return knock_dropped(node)  # one for each node, not one for each of its tens of thousands of knocks


def _read_records(lab, nodes) -> dict[str, witness.FirewallRecord]:
    records = {node: witness.parse_record(node, lab.nft(node, ["list", "table", "inet", witness.TABLE], json=True))
               for node in nodes}
    for node in nodes:
        lab.nft_load(node, witness.flush_text())
    return records


def _probe(lab, nodes, targets: dict[str, list[ProbeTarget]], dropped: set[int] = frozenset(), traced: bool = True):
    """Every host's probes at once, under tracing when `traced` -> (results by id, the nodes' records,
    their traces)."""
    if not traced:
        results = lab.run_probes(targets, unanswered=frozenset(map(str, dropped)))
        return results, _read_records(lab, nodes), {}
    lab.start_trace(nodes)
    try:
        results = lab.run_probes(targets, unanswered=frozenset(map(str, dropped)))
    finally:
        traces = lab.stop_trace()
    return results, _read_records(lab, nodes), traces


def _knock(lab, exposures: list[Check], topology: Topology) -> list[str]:
    """Send the knocks, then wait until each path's first node has counted its share (or give up)."""
    errors = lab.run_knocks(knocks_by_host(exposures, topology))
    first = Counter(c.enforcers[0].node for c in exposures if c.endpoint.transport != "icmp")  # pings are not counted
    deadline = time.monotonic() + KNOCK_WAIT
    while time.monotonic() < deadline:
        counted = {node: witness.parse_record(node, lab.nft(node, ["list", "counter", "inet", witness.TABLE,
                                                                   witness.KNOCK_COUNTER], json=True)).knocks_seen
                   for node in first}
        if all(counted[node] >= total for node, total in first.items()):
            break
        time.sleep(0.05)
    time.sleep(KNOCK_SETTLE)  # the later nodes of multi-firewall paths, and a capture's last packets
    return errors


def _sweep(lab, nodes, exposures: list[Check], topology: Topology, dead: dict[str, str]):
    """Knock every check's port (exposures, or required flows) -> (the nodes' records, per node: did
    it count every knock due, errors)."""
    errors = _knock(lab, [c for c in exposures if c.client_host not in dead], topology)
    records = _read_records(lab, nodes)
    due: Counter = Counter()
    address = {host.name: host.address for host in topology.hosts}
    for check in exposures:
        if check.client_host in dead or check.endpoint.transport == "icmp":
            continue  # never sent, or a ping: listed, never counted
        key = (address[check.client_host], address[check.server_host], check.endpoint.transport, check.endpoint.port)
        for enforcer in check.enforcers:
            due[enforcer.node] += 1
            if key not in records[enforcer.node].passed:
                break  # dropped here: the next node never sees it
    return records, {node: records[node].knocks_seen >= due[node] for node in nodes}, errors


# -- the audit ------------------------------------------------------------------------------------
def run_audit(lab, checks: list[Check], rules_source: str, timeout: float = PROBE_TIMEOUT,
              rulesets: dict[str, Ruleset] | None = None, explain_all: bool = False,
              progress: Callable[[str, str], None] | None = None) -> AuditReport:
    """Probe, sweep and judge every check against the rules already applied to the lab.

    `rulesets` (node -> Ruleset) names the files findings are attributed to; by default what
    `lab.apply_rules` applied to each node. `progress(phase, words)` is called as each of
    AUDIT_PHASES starts (for the console; it must not raise)."""
    progress = progress or (lambda _phase, _words: None)
    topology, catalog = lab.topology, lab.catalog
    rulesets = {**lab.rulesets, **(rulesets or {})}
    nodes = sorted({e.node for c in checks for e in c.enforcers})
    for node in nodes:
        lab.nft_load(node, witness.table_text())
    egress_before = lab.egress_drops()
    timings: dict[str, float] = {}

    started = time.monotonic()
    required = sum(c.kind == CheckKind.REQUIRED for c in checks)
    progress("knock", f"knocking once for each of {required} required flow checks")
    dropped = _first_packet_dropped(lab, nodes, checks, topology)
    targets = probe_targets(checks, topology, timeout, lab.ca_file, dropped)
    progress("probe", f"probing {required} required flow checks")
    # Traced only when passing checks are explained too: otherwise the findings alone are probed
    # again under tracing below, and an audit that finds nothing never pays for a trace.
    results, records, traces = _probe(lab, nodes, targets, dropped, traced=explain_all)
    timings["probe"] = time.monotonic() - started

    started = time.monotonic()
    exposures = [c for c in checks if c.kind == CheckKind.EXPOSURE]
    progress("sweep", f"knocking {len(exposures)} exposure ports")
    sweep, complete, knock_errors = _sweep(lab, nodes, exposures, topology, lab.dead_daemons())
    timings["sweep"] = time.monotonic() - started

    lossy = {link: lab.impairment(link).loss for link in lab.links if lab.impairment(link).loss}

    def judged(indexes, results, records) -> dict[int, FlowVerdict]:
        dead, saw = lab.dead_daemons(), _server_witness(lab.request_log())
        out = {}
        with _collector_paused():
            for index in indexes:
                check, result = checks[index], results.get(str(index))
                if check.kind == CheckKind.EXPOSURE:
                    out[index] = exposure_verdict(check, topology, sweep, saw, dead, complete, lossy, catalog)
                    continue
                evidence = None
                if check.kind == CheckKind.REQUIRED:
                    evidence = evidence_for(check, topology, result, records, saw, dead, lossy=lossy)
                out[index] = _verdict(check, judge(check, evidence, catalog), result)
        return out

    progress("judge", "judging the evidence (unanswered flows are probed once more, alone)")
    verdicts = judged(range(len(checks)), results, records)
    started = time.monotonic()
    again, short = probed_again(verdicts, checks, topology, lossy, dropped)
    if again:
        wanted = {str(i) for i in again}
        subset = {host: [t for t in ts if t.id in wanted]
                  for host, ts in probe_targets(checks, topology, timeout, lab.ca_file, short).items()}
        retried, retried_records, retried_traces = _probe(lab, nodes, subset, traced=explain_all)
        verdicts.update(judged(again, retried, retried_records))
        traces = _merge(traces, retried_traces)
    timings["retry"] = time.monotonic() - started
    verdicts = [verdicts[i] for i in range(len(checks))]

    # the findings, run again under tracing so the rule that decided is named (see phase 3 above)
    started = time.monotonic()
    blocked = [] if explain_all else [(i, v) for i, v in enumerate(verdicts) if v.verdict == Verdict.BLOCKED]
    # Only for the trace (the verdicts stand on the first exchange): a dropped request needs its
    # first packet again, a knock; a dropped reply or FTP data channel needs the exchange, a probe.
    knocks = [v.check for v in verdicts if v.verdict == Verdict.EXPOSED] + _one_knock_each(
        [v.check for _i, v in blocked if v.direction == "request" and _knockable(v.check)])
    reprobed = {str(i) for i, v in blocked if not (v.direction == "request" and _knockable(v.check))}
    progress("attribute", "naming the rule behind each finding")
    if knocks or reprobed:
        lab.start_trace(nodes)
        try:
            if reprobed:
                lab.run_probes({host: [replace(t, timeout=min(t.timeout, ATTRIBUTE_TIMEOUT)) for t in ts if t.id in reprobed]
                                for host, ts in targets.items()}, unanswered=frozenset(reprobed))
            if knocks:
                _knock(lab, knocks, topology)
        finally:
            traces = _merge(traces, lab.stop_trace())
    timings["attribute"] = time.monotonic() - started
    # the rule maps (every node's ruleset listed and matched to its file) only when something is explained
    why = (explainer(lab, nodes, rulesets, traces) if any(_explained(v, explain_all) for v in verdicts)
           else Explainer({}, {}, traces))
    verdicts = attribute(verdicts, topology, why, rulesets, explain_all)
    if knock_errors:
        verdicts.append(FlowVerdict(Check(CheckKind.EXPOSURE, None, None, None, None), Verdict.LAB_ERROR,
                                    detail=f"{len(knock_errors)} knocks could not be sent: {knock_errors[0]}"))
    return AuditReport(topology.name, rules_source, verdicts, timings, topology.profile.to_dict(),
                       egress_drops=_egress_during(egress_before, lab.egress_drops()))


def probed_again(verdicts: dict[int, FlowVerdict], checks: list[Check], topology: Topology,
                 lossy: dict[str, float], dropped: set[int]) -> tuple[list[int], set[int]]:
    """The checks to probe once more, alone, and which of them keep the short timeout of a dropped
    first packet.

    A required flow every firewall passed but that got no answer was probed while all hosts probed
    at once: probed again (with the whole timeout, whatever a knock said), a busy stub is not
    reported as the firewall's BROKEN. So is an unanswered probe that a node has no record of: its
    daemon, busy starting a thousand probes, may have let its short timeout run out before the
    request left, a lab fault that is not one (it keeps its short timeout: alone, nothing delays
    it). Not on a lossy path: the loss is what that lab shows."""
    again, short = [], set()
    for i, v in verdicts.items():
        if v.observed not in RETRIED:
            continue
        if v.verdict == Verdict.BROKEN:
            again.append(i)
        elif (v.verdict == Verdict.LAB_ERROR and checks[i].kind == CheckKind.REQUIRED
              and not path_loss(checks[i], topology, lossy)):
            again.append(i)
            if i in dropped:
                short.add(i)
    return again, short


@contextmanager
def _collector_paused() -> Iterator[None]:
    """No cyclic garbage collection meanwhile: judging makes a few objects per check, none of them
    cycles, and with tens of thousands of checks the collector's full passes over every live object
    cost a third of the judging."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _egress_during(before: dict[str, int], after: dict[str, int]) -> int:
    """Packets the lab's nodes dropped for leaving the lab between two readings of `Lab.egress_drops`."""
    return sum(max(0, count - before.get(node, 0)) for node, count in after.items())


def _verdict(check: Check, judgement: Judgement, result: ProbeResult | None) -> FlowVerdict:
    # from the certificate the probe actually received, not from what the lab installed
    certificate = "pre-installed" if result and result.tls_issuer == LAB_CA_NAME else ""
    observed = result.outcome if result else ("knock" if check.kind == CheckKind.EXPOSURE else "")
    return FlowVerdict(check, judgement.verdict, str(observed), result.exchange if result else "",
                       judgement.detail, result.elapsed if result else 0.0, certificate, judgement.node,
                       judgement.direction)


def _merge(a: dict[str, str], b: dict[str, str]) -> dict[str, str]:
    return {node: a.get(node, "") + "\n" + b.get(node, "") for node in set(a) | set(b)}


# -- why: the rule that decided -------------------------------------------------------------------
@dataclass
class Explainer:
    """Rule maps (loaded rules -> the user's file lines) and the traced packets of one audit.

    A node's trace is parsed on the first question about it: an audit without findings never
    needs one (the default lab's is ~30,000 lines, a second of parsing)."""

    rule_maps: dict[str, attribution.RuleMap]
    indexes: dict[str, attribution.SourceIndex]
    traces: dict[str, str]  # node -> its `nft monitor trace` text
    _by_pair: dict[str, dict[frozenset, list[trace.PacketTrace]]] = field(default_factory=dict, repr=False)

    def packets_between(self, node: str, a: str, b: str) -> list[trace.PacketTrace]:
        """`node`'s traced packets between two addresses (either way), in the order first seen."""
        if node not in self._by_pair:
            by_pair: dict[frozenset, list[trace.PacketTrace]] = defaultdict(list)
            for packet in trace.parse_trace(self.traces.get(node, "")):
                by_pair[frozenset((packet.saddr, packet.daddr))].append(packet)
            self._by_pair[node] = by_pair
        return self._by_pair[node].get(frozenset((a, b)), [])

    def decision(self, node: str, src: str, dst: str, transport: str, port: int | None,
                 fates: tuple[trace.Fate, ...], reply: bool = False, data_from: int | None = None):
        """The traced decision of `node` on the first matching packet whose fate is one of `fates`."""
        for packet in self.packets_between(node, src, dst):
            if packet.decision is None or packet.fate not in fates or packet.protocol != transport:
                continue
            if data_from is not None:  # an FTP data connection between the two hosts, either way
                if packet.dport != data_from:
                    return packet.decision
                continue
            if reply:
                if (packet.saddr, packet.daddr) == (dst, src) and (port is None or packet.sport == port):
                    return packet.decision
            elif (packet.saddr, packet.daddr) == (src, dst) and (transport == "icmp" or packet.dport == port):
                return packet.decision
        return None

    def describe(self, node: str, decision) -> str:
        rule_map = self.rule_maps.get(node)
        if decision is None:
            return f"{node}: the trace recorded no decision for this packet"
        if rule_map is None:
            return f"{node}: {decision.text or decision.chain + ' policy ' + str(decision.verdict)}"
        return f"{node} {rule_map.explain(decision).describe()}"


def explainer(lab, nodes, rulesets: dict[str, Ruleset], traces: dict[str, str]) -> Explainer:
    rule_maps, indexes = {}, {}
    for node in nodes:
        ruleset = rulesets.get(node)
        if ruleset is None:
            continue
        indexes[node] = attribution.index_source(ruleset)
        rule_maps[node] = attribution.attribute(lab.rule_listing(node), indexes[node])
    return Explainer(rule_maps, indexes, traces)


_DROPPED = (trace.Fate.DROP, trace.Fate.REJECT)


def attribute(verdicts: list[FlowVerdict], topology: Topology, why: Explainer,
              rulesets: dict[str, Ruleset], explain_all: bool = False) -> list[FlowVerdict]:
    """Name the rule behind every finding (every probed check with explain_all), and the rule that
    would admit each blocked flow, in the format of the node's own rules file."""
    out = []
    for v in verdicts:
        c = v.check
        if not _explained(v, explain_all):
            out.append(v)
            continue
        ep = c.endpoint
        src, dst = topology.host(c.client_host).address, topology.host(c.server_host).address
        if v.verdict == Verdict.BLOCKED:
            reply, data = v.direction == "reply", v.direction == "data"
            decision = why.decision(v.node, src, dst, ep.transport, ep.port, _DROPPED, reply=reply,
                                    data_from=ep.port if data else None)
            rule, fix = why.describe(v.node, decision), ""
            ruleset = rulesets.get(v.node)
            if ruleset is not None:
                fix = _fix(ruleset, why.indexes.get(v.node), v, src, dst, decision)
        else:  # let through: the accepting rule of every node on the path
            rule = "; ".join(why.describe(e.node, why.decision(e.node, src, dst, ep.transport, ep.port,
                                                               (trace.Fate.ACCEPT,)))
                             for e in c.enforcers)
            fix = ""
        out.append(replace(v, rule=rule, fix=fix))
    return out


def _explained(v: FlowVerdict, explain_all: bool) -> bool:
    """Whether `attribute` names the rule behind a verdict: findings, and passing checks with explain_all."""
    wanted = v.verdict in (Verdict.BLOCKED, Verdict.EXPOSED) or (explain_all and v.verdict in PASSED)
    return wanted and bool(v.check.enforcers)


_REPLY_HOOK = {"input": "output", "output": "input", "forward": "forward"}  # the hook a reply crosses


def _fix(ruleset: Ruleset, index: attribution.SourceIndex | None, v: FlowVerdict, src: str, dst: str,
         decision) -> str:
    """The rule that would admit a blocked flow, in the user's format, for the packet that was stopped."""
    c, ep = v.check, v.check.endpoint
    hook = next((e.hook for e in c.enforcers if e.node == v.node), "forward")
    if v.direction == "reply":  # a missing state rule: only connection state admits a reply
        hook = _REPLY_HOOK.get(hook, hook)
        return attribution.reply_rule(ruleset.format, (index.base_chain(hook) if index else None) or hook)
    chain = (index.base_chain(hook) if index else None) or hook
    if v.direction == "data":  # the FTP data channels: the helper admits them as RELATED
        return attribution.ftp_helper_rule(ruleset.format, dst, ep.port, "output" if hook == "output" else "prerouting",
                                           chain if isinstance(chain, attribution.SourceChain) else None)
    return attribution.allow_rule(ruleset.format, src, dst, ep.transport, ep.port, chain,
                                  insert=bool(decision and decision.kind == trace.DecisionKind.RULE))


def is_finding(v: FlowVerdict) -> bool:
    return v.verdict in FIREWALL_FINDINGS or v.verdict in LAB_FAULTS
