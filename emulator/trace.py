"""The firewall's own record of each probe packet: `nft monitor trace` text in, typed traces out.

Wire spec (nftables 1.0.6; `nft -a monitor trace` adds `# handle N` to rule lines). Every line is
`trace id <8 hex> <family> <table> <chain> <event>`, and the lines of one packet share the id:
  packet: iif "fwa" oif "fwb" ... ip saddr A ip daddr B ... tcp sport N tcp dport M tcp flags == syn ...
      (once per base chain the packet enters: hooks, not jumps, print a new packet line)
  rule <rule as nft prints it> [# handle N] (verdict accept|drop|continue|return|jump X|goto X|queue)
  unknown rule handle N (verdict V)   (the rule was added after the monitor started)
  policy accept|drop [meta mark == ...]
  verdict continue|return             (implicit return from a chain, older kernels only)
  conntrack: ct direction ... ct state ...   (newer nft releases)
Lines of different packets interleave (a REJECT's ICMP error is traced before the rule that sent it).

Pure: no I/O. The lab loads `TRACE_TABLE` after the user's rules and runs `MONITOR_COMMAND`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum

TRACE_TABLE_NAME = "safeq_lab_trace"

# Two stages per hook. The -310 chains run before the raw tables (-300), so a raw-table DROP or
# NOTRACK is traced too; they can only match statelessly (no conntrack yet). The -190 chains run
# after conntrack (-200) and catch what the stateless rules miss (e.g. a loose-tracked mid-stream ACK).
# `out*` covers what the firewall host itself originates (host firewalls, its REJECT answers).
_TRACE_STAGES = """\
  chain {name}_raw {{
    type filter hook {hook} priority -310; policy accept;
    tcp flags & (syn | ack) == syn meta nftrace set 1
    tcp flags & (syn | ack) == syn | ack meta nftrace set 1
    meta l4proto {{ udp, icmp }} meta nftrace set 1
  }}
  chain {name} {{
    type filter hook {hook} priority -190; policy accept;
    ct state new meta nftrace set 1
    ct direction reply tcp flags & (syn | ack) == syn | ack meta nftrace set 1
    ct direction reply meta l4proto {{ udp, icmp }} meta nftrace set 1
  }}
"""
TRACE_TABLE = (f"table inet {TRACE_TABLE_NAME} {{\n"
               + _TRACE_STAGES.format(name="pre", hook="prerouting")
               + _TRACE_STAGES.format(name="out", hook="output") + "}\n")
MONITOR_COMMAND = ("nft", "-a", "monitor", "trace")


class Verdict(StrEnum):
    ACCEPT = "accept"
    DROP = "drop"
    CONTINUE = "continue"
    RETURN = "return"
    JUMP = "jump"
    GOTO = "goto"
    QUEUE = "queue"
    STOLEN = "stolen"


class Fate(StrEnum):
    ACCEPT = "accept"
    DROP = "drop"
    REJECT = "reject"
    UNKNOWN = "unknown"  # the trace stops before any verdict (monitor stopped, lines lost)


class DecisionKind(StrEnum):
    RULE = "rule"
    POLICY = "policy"


_PASSING = (Verdict.CONTINUE, Verdict.RETURN, Verdict.JUMP, Verdict.GOTO)
_TCP_FLAGS = ("fin", "syn", "rst", "psh", "ack", "urg", "ecn", "cwr")  # bit 0 upwards


@dataclass(frozen=True)
class RuleHit:
    family: str
    table: str
    chain: str
    handle: int | None  # None without `nft -a`
    text: str  # as nft prints it, counter values removed so texts compare across runs
    verdict: Verdict
    target: str | None = None  # chain of a jump/goto

    @property
    def is_reject(self) -> bool:
        return self.verdict == Verdict.DROP and _is_reject(self.text)


@dataclass(frozen=True)
class PolicyHit:
    family: str
    table: str
    chain: str
    policy: Verdict


@dataclass(frozen=True)
class Decision:
    """The step that settled a packet: a rule with a terminal verdict, or a base chain's policy."""
    kind: DecisionKind
    family: str
    table: str
    chain: str
    verdict: Verdict
    fate: Fate
    handle: int | None = None  # rules only
    text: str = ""  # rule text; for a policy, e.g. 'policy drop'


@dataclass(frozen=True)
class PacketTrace:
    trace_id: str
    iif: str | None
    oif: str | None
    saddr: str | None
    daddr: str | None
    protocol: str | None  # 'tcp' | 'udp' | 'icmp' | 'icmpv6' | another nft protocol name
    sport: int | None
    dport: int | None
    tcp_flags: frozenset[str]  # e.g. {'syn'} or {'syn', 'ack'}; empty unless tcp
    icmp_type: str | None  # e.g. 'echo-request'
    base_chains: tuple[str, ...]  # 'ip filter FORWARD', in the order the packet met them
    hits: tuple[RuleHit, ...]  # every rule of the user's that matched, jumps included
    policies: tuple[PolicyHit, ...]
    decisions: tuple[Decision, ...]  # one per base chain that settled the packet, in order
    fate: Fate  # accepted only if no base chain dropped it
    decision: Decision | None  # the deciding step; None when no chain of the user's saw the packet


@dataclass(frozen=True)
class TraceLog:
    packets: tuple[PacketTrace, ...]
    malformed: int  # lines that are not trace lines nft 1.0.x prints; skipped
    first_malformed: str = ""  # the first of them, for a one-line message


_HEADER = re.compile(r"trace id (?P<id>[0-9a-f]{8}) (?P<family>ip|ip6|inet|arp|bridge|netdev) "
                     r"(?P<table>\S+) (?P<chain>\S+)(?: (?P<event>.*))?$")
_RULE = re.compile(r"rule (?P<text>.*?)(?: # handle (?P<handle>\d+))? \(verdict (?P<verdict>[^)]*)\)$")
_UNKNOWN_RULE = re.compile(r"unknown rule handle (?P<handle>\d+) \(verdict (?P<verdict>[^)]*)\)$")
_POLICY = re.compile(r"policy (?P<policy>\w+)(?: meta mark == \S+)?$")
_RETURN = re.compile(r"(?:verdict \w+)?(?: ?meta mark == \S+)?$")
_COUNTER_VALUES = re.compile(r"\bcounter packets \d+ bytes \d+")
_TRAILING_COMMENT = re.compile(r'\s+comment "(?:[^"\\]|\\.)*"$')
_REJECT = re.compile(r'(?:^|\s)reject(?:\s+with\s+.*)?$|\bxt target REJECT$')

_FIELDS = {
    "iif": re.compile(r'\biif (?:"([^"]*)"|(\S+))'),
    "oif": re.compile(r'\boif (?:"([^"]*)"|(\S+))'),
    "saddr": re.compile(r"\bip6? saddr (\S+)"),
    "daddr": re.compile(r"\bip6? daddr (\S+)"),
    "protocol": re.compile(r"\b(tcp|udp|udplite|sctp|dccp|icmpv6|icmp) (?:sport|type)\b"),
    "sport": re.compile(r"\b(?:tcp|udp|udplite|sctp|dccp) sport (\d+)"),
    "dport": re.compile(r"\b(?:tcp|udp|udplite|sctp|dccp) dport (\d+)"),
    "icmp_type": re.compile(r"\bicmp(?:v6)? type (\S+)"),
    "tcp_flags": re.compile(r"\btcp flags == ((?:[a-z]+|0x[0-9a-f]+)(?: \| (?:[a-z]+|0x[0-9a-f]+))*)"),
}
_FALLBACK_PROTOCOL = re.compile(r"\b(?:ip protocol|ip6 nexthdr) (\S+)")


def _is_reject(text: str) -> bool:
    return bool(_REJECT.search(_TRAILING_COMMENT.sub("", text)))


def _tcp_flags(value: str) -> frozenset[str]:
    names: set[str] = set()
    for part in value.split(" | "):
        if part.startswith("0x"):
            bits = int(part, 16)
            names.update(name for i, name in enumerate(_TCP_FLAGS) if bits & (1 << i))
        else:
            names.add(part)
    return frozenset(names)


def _packet_fields(text: str) -> dict:
    found: dict = {}
    for name, pattern in _FIELDS.items():
        match = pattern.search(text)
        if match:
            found[name] = next(g for g in match.groups() if g is not None)
    if "protocol" not in found and (match := _FALLBACK_PROTOCOL.search(text)):
        found["protocol"] = match.group(1)
    for name in ("sport", "dport"):
        if name in found:
            found[name] = int(found[name])
    if "tcp_flags" in found:
        found["tcp_flags"] = _tcp_flags(found["tcp_flags"])
    return found


def _verdict(text: str) -> tuple[Verdict, str | None] | None:
    word, _, target = text.strip().partition(" ")
    try:
        verdict = Verdict(word)
    except ValueError:
        return None
    return verdict, (target.strip() or None)


@dataclass
class _Packet:
    """One packet's lines while they are being read."""
    trace_id: str
    own_fields: dict = field(default_factory=dict)  # our table's packet line: fills what the user's lack
    fields: dict = field(default_factory=dict)
    base_chains: list = field(default_factory=list)
    hits: list = field(default_factory=list)
    policies: list = field(default_factory=list)
    decisions: list = field(default_factory=list)  # one per base chain that finished
    seen_packet_lines: set = field(default_factory=set)


def _chain_name(family: str, table: str, chain: str) -> str:
    return f"{family} {table} {chain}"


def _rule_decision(hit: RuleHit) -> Decision:
    fate = {Verdict.ACCEPT: Fate.ACCEPT, Verdict.DROP: Fate.REJECT if hit.is_reject else Fate.DROP}
    return Decision(DecisionKind.RULE, hit.family, hit.table, hit.chain, hit.verdict,
                    fate.get(hit.verdict, Fate.UNKNOWN), hit.handle, hit.text)


def _finish(packet: _Packet) -> PacketTrace:
    fields = {**packet.own_fields, **packet.fields}
    dropped = [d for d in packet.decisions if d.fate != Fate.ACCEPT]
    finished = len(packet.decisions) == len(packet.base_chains)
    if dropped:
        decision = dropped[0]
    elif packet.decisions and finished:
        # the last rule that let it through says more than a later chain's policy (say, nat's)
        rules = [d for d in packet.decisions if d.kind == DecisionKind.RULE]
        decision = (rules or packet.decisions)[-1]
    else:
        decision = None
    if decision is not None:
        fate = decision.fate
    else:  # no chain of the user's saw it (accepted), or one never finished (unknown)
        fate = Fate.UNKNOWN if packet.base_chains else Fate.ACCEPT
    return PacketTrace(packet.trace_id, fields.get("iif"), fields.get("oif"), fields.get("saddr"),
                       fields.get("daddr"), fields.get("protocol"), fields.get("sport"), fields.get("dport"),
                       fields.get("tcp_flags", frozenset()), fields.get("icmp_type"),
                       tuple(packet.base_chains), tuple(packet.hits), tuple(packet.policies),
                       tuple(packet.decisions), fate, decision)


class _Reader:
    """Lines in, packets out; a packet closes when its id shows up again for a chain it already met."""

    def __init__(self):
        self.open: dict[str, tuple[int, _Packet]] = {}
        self.done: list[tuple[int, PacketTrace]] = []
        self.count = 0

    def packet(self, trace_id: str) -> _Packet:
        if trace_id not in self.open:
            self.open[trace_id] = (self.count, _Packet(trace_id))
            self.count += 1
        return self.open[trace_id][1]

    def close(self, trace_id: str) -> None:
        position, packet = self.open.pop(trace_id)
        self.done.append((position, _finish(packet)))

    def packets(self) -> tuple[PacketTrace, ...]:
        for trace_id in list(self.open):
            self.close(trace_id)
        return tuple(p for _, p in sorted(self.done, key=lambda item: item[0]))

    def record(self, header: re.Match) -> bool:
        """Add one line to its packet; False when the line is not one nft prints."""
        trace_id, family, table, chain = header.group("id", "family", "table", "chain")
        event = (header.group("event") or "").strip()
        own = table == TRACE_TABLE_NAME
        if event.startswith("packet:"):
            key = (family, table, chain)
            # trace ids are hashes and can repeat (a retransmission in the same skb slot): a packet
            # never enters the same base chain twice, so a second packet line starts a new packet
            if trace_id in self.open and key in self.open[trace_id][1].seen_packet_lines:
                self.close(trace_id)
            packet = self.packet(trace_id)
            packet.seen_packet_lines.add(key)
            fields = _packet_fields(event[len("packet:"):])
            if own:
                packet.own_fields = {**fields, **packet.own_fields}
            else:
                packet.fields = {**fields, **packet.fields}  # the first user chain's values win
                packet.base_chains.append(_chain_name(family, table, chain))
            return True
        if event.startswith("conntrack:") or _RETURN.fullmatch(event):
            return True  # not a decision: a chain ending without verdict, or conntrack state
        if (match := _POLICY.fullmatch(event)):
            verdict = _verdict(match.group("policy"))
            if verdict is None:
                return False
            if not own:
                self.policy(self.packet(trace_id), PolicyHit(family, table, chain, verdict[0]))
            return True
        match = _RULE.fullmatch(event) or _UNKNOWN_RULE.fullmatch(event)
        verdict = _verdict(match.group("verdict")) if match else None
        if verdict is None:
            return False
        if not own:
            handle = int(match.group("handle")) if match.group("handle") else None
            text = match.groupdict().get("text") or f"unknown rule handle {handle}"
            text = " ".join(_COUNTER_VALUES.sub("counter", text).split())
            self.rule(self.packet(trace_id), RuleHit(family, table, chain, handle, text, *verdict))
        return True

    @staticmethod
    def policy(packet: _Packet, hit: PolicyHit) -> None:
        _enter(packet, hit.family, hit.table, hit.chain)
        packet.policies.append(hit)
        fate = Fate.ACCEPT if hit.policy == Verdict.ACCEPT else Fate.DROP
        packet.decisions.append(Decision(DecisionKind.POLICY, hit.family, hit.table, hit.chain, hit.policy,
                                         fate, text=f"policy {hit.policy}"))

    @staticmethod
    def rule(packet: _Packet, hit: RuleHit) -> None:
        packet.hits.append(hit)
        if hit.verdict not in _PASSING:
            _enter(packet, hit.family, hit.table, hit.chain)
            packet.decisions.append(_rule_decision(hit))


def read_trace(text: str) -> TraceLog:
    """Group `nft monitor trace` lines into packets; never raises on garbage, counts it instead."""
    reader = _Reader()
    malformed, first_malformed = 0, ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        header = _HEADER.match(line)
        if not header or not reader.record(header):
            malformed += 1
            first_malformed = first_malformed or line[:200]
    return TraceLog(reader.packets(), malformed, first_malformed)


def parse_trace(text: str) -> list[PacketTrace]:
    """The packets of a `nft [-a] monitor trace` capture, in the order they were first seen."""
    return list(read_trace(text).packets)


def _enter(packet: _Packet, family: str, table: str, chain: str) -> None:
    """A decision without its packet line (line lost): count the base chain it settled."""
    if len(packet.decisions) == len(packet.base_chains):
        packet.base_chains.append(_chain_name(family, table, chain))
