"""The firewall's own record of what it did: kernel sets filled by nftables, read after probing.

A table of ours sits around each filtering node's rules (a firewall node, or a host carrying
its own firewall). Before any filter rule runs it adds the first packet of every connection to
``seen``; after every filter chain of the hook has run (priority 500) it adds the packets that
survived to ``passed``, and the first reply (TCP SYN-ACK, UDP) to ``replied``. So for each
connection the kernel itself says whether the node let it through, whatever the rules are
written in (iptables-nft or nft): seen and not passed means the node dropped or rejected it.
Nothing here re-implements rule matching; which rule decided comes from tracing (emulator.trace).

Exposure knocks (emulator.knock, marked DSCP CS1) are tens of thousands: they are counted
(``knocks_seen``) rather than listed one by one, and only the few a node passes are listed.

Pure text and parsing; the lab loads the table and hands back ``nft -j list table`` output.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from emulator.knock import KNOCK_DSCP

TABLE = "safeq_lab_witness"
WITNESS_PRIORITY = 500  # after every filter chain users write (iptables-nft filter is 0)
SETS = ("seen", "passed", "replied", "pings_seen", "pings_passed", "pings_replied")
KNOCK_COUNTER = "knocks_seen"

_FLOW_SET = "type ipv4_addr . ipv4_addr . inet_proto . inet_service; size 1048576; flags dynamic;"
_PING_SET = "type ipv4_addr . ipv4_addr; size 262144; flags dynamic;"
_KEY = "ip saddr . ip daddr . meta l4proto . th dport"
_REPLY_KEY = "ip daddr . ip saddr . meta l4proto . th sport"  # stored in the original direction
_FIRST = ("ip dscp %s ct state new meta l4proto { tcp, udp } counter name %s\n"
          "    ip dscp != %s ct state new,related meta l4proto { tcp, udp } add @seen { %s }\n"
          "    ct state new icmp type echo-request add @pings_seen { ip saddr . ip daddr }"
          % (KNOCK_DSCP, KNOCK_COUNTER, KNOCK_DSCP, _KEY))
_PASSED = ("ct state new,related meta l4proto { tcp, udp } add @passed { %s }\n"
           "    ct state new icmp type echo-request add @pings_passed { ip saddr . ip daddr }\n"
           "    ct direction reply tcp flags & (syn | ack) == syn | ack add @replied { %s }\n"
           "    ct direction reply meta l4proto udp add @replied { %s }\n"
           "    ct direction reply icmp type echo-reply add @pings_replied { ip daddr . ip saddr }"
           % (_KEY, _REPLY_KEY, _REPLY_KEY))


def table_text() -> str:
    """The nft table to load into a filtering node after its rules (a flush of the ruleset removes it)."""
    chains = [("first_in", "prerouting", -190, _FIRST), ("first_out", "output", -190, _FIRST)]
    chains += [(f"passed_{hook}", hook, WITNESS_PRIORITY, _PASSED) for hook in ("forward", "input", "output")]
    # declare-then-delete first: loading it again replaces the table instead of doubling its rules
    lines = [f"table inet {TABLE}", f"delete table inet {TABLE}", f"table inet {TABLE} {{"]
    lines += [f"  set {name} {{ {_PING_SET if name.startswith('pings') else _FLOW_SET} }}" for name in SETS]
    lines.append(f"  counter {KNOCK_COUNTER} {{ }}")
    for name, hook, priority, body in chains:
        lines += [f"  chain {name} {{", f"    type filter hook {hook} priority {priority}; policy accept;",
                  f"    {body}", "  }"]
    lines.append("}")
    return "\n".join(lines) + "\n"


def flush_text() -> str:
    """nft commands emptying the record between audit phases."""
    return "".join(f"flush set inet {TABLE} {name}\n" for name in SETS) + f"reset counter inet {TABLE} {KNOCK_COUNTER}\n"


FlowKey = tuple[str, str, str, int]  # (source, destination, 'tcp'|'udp', destination port)


@dataclass
class FirewallRecord:
    """What one filtering node saw and let through, keyed by connection."""

    node: str
    seen: set[FlowKey] = field(default_factory=set)
    passed: set[FlowKey] = field(default_factory=set)
    replied: set[FlowKey] = field(default_factory=set)
    pings_seen: set[tuple[str, str]] = field(default_factory=set)
    pings_passed: set[tuple[str, str]] = field(default_factory=set)
    pings_replied: set[tuple[str, str]] = field(default_factory=set)
    knocks_seen: int = 0  # exposure knocks that reached the node's rules (counted, not listed)

    def fate(self, src: str, dst: str, transport: str, port: int | None) -> "Fate":
        """What this node did to the first packet (and the first reply) of one connection."""
        if transport == "icmp":
            pair = (src, dst)
            return Fate(pair in self.pings_seen, pair in self.pings_passed, pair in self.pings_replied)
        key = (src, dst, transport, port)
        return Fate(key in self.seen, key in self.passed, key in self.replied)

    def dropped_between(self, a: str, b: str, transport: str = "tcp") -> list[FlowKey]:
        """Connections between two hosts (either direction) this node saw but did not pass."""
        return sorted(k for k in self.seen - self.passed if k[2] == transport and {k[0], k[1]} == {a, b})

    def knocked(self, src: str, dst: str, transport: str, port: int, complete: bool) -> "Fate":
        """An exposure knock's fate; `complete` when the node counted every knock expected to reach it."""
        return Fate(complete, (src, dst, transport, port) in self.passed, False)


@dataclass(frozen=True)
class Fate:
    seen: bool
    passed: bool
    replied: bool

    @property
    def dropped(self) -> bool:
        return self.seen and not self.passed


def parse_record(node: str, listing: str) -> FirewallRecord:
    """``nft -j list table inet safeq_lab_witness`` output -> the node's record."""
    record = FirewallRecord(node)
    try:
        items = json.loads(listing).get("nftables", [])
    except (ValueError, AttributeError):
        return record
    for item in items:
        counter = item.get("counter") if isinstance(item, dict) else None
        if isinstance(counter, dict) and counter.get("name") == KNOCK_COUNTER and counter.get("table") == TABLE:
            record.knocks_seen = int(counter.get("packets", 0))
        nft_set = item.get("set") if isinstance(item, dict) else None
        if not nft_set or nft_set.get("table") != TABLE or nft_set.get("name") not in SETS:
            continue
        target = getattr(record, nft_set["name"])
        for element in nft_set.get("elem", []):
            parts = element.get("concat") if isinstance(element, dict) else None
            if isinstance(element, dict) and "elem" in element:  # elements with timeouts/counters
                parts = element["elem"].get("val", {}).get("concat")
            if not parts:
                continue
            if len(parts) == 4:
                target.add((str(parts[0]), str(parts[1]), str(parts[2]), int(parts[3])))
            elif len(parts) == 2:
                target.add((str(parts[0]), str(parts[1])))
    return record
