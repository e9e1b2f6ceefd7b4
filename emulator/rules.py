"""Firewall rulesets: the least-privilege ruleset a topology needs, and users' own rule files.

Generation is pure text from the audit plan; validation runs the real tools in a throwaway
network namespace (`unshare --net`), so the host's own rules are never touched.
"""
from __future__ import annotations

import ipaddress
import os
import re
import shlex
import shutil
import subprocess
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from emulator import userfile
from emulator.errors import LabError
from emulator.plan import Check
from emulator.topology import INTERFACE_MAX, Topology

FORMATS = ("iptables", "nft")


@dataclass(frozen=True)
class Ruleset:
    format: str  # 'iptables' (iptables-save / iptables-restore) | 'nft'
    text: str
    source: str  # where it came from, for messages and reports

    def __post_init__(self):
        if self.format not in FORMATS:
            raise LabError(f"unknown rules format {self.format!r}; use one of {', '.join(FORMATS)}")


def _node(topology: Topology, node: str | None) -> str:
    node = node or topology.firewall
    if node not in topology.filtering_nodes:
        raise LabError(f"{node!r} holds no ruleset in topology {topology.name}: rules are generated for its firewall "
                       f"nodes and hosts with a host firewall ({', '.join(topology.filtering_nodes)})")
    return node


def enforced(topology: Topology, checks: list[Check], node: str | None = None, hook: str | None = None) -> list[Check]:
    """Required checks whose traffic meets `node`'s ruleset (in `hook`, or any), in plan order.

    `node` defaults to the first firewall node. A firewall node enforces the flows it forwards
    (client and server behind different nodes cross both); a host firewall enforces what its
    host serves (input) and sends (output). Same-segment flows meet no firewall node.
    """
    node = _node(topology, node)
    paths: dict[tuple[str, str], tuple] = {}
    chosen = []
    for c in checks:
        if c.kind != "required":
            continue
        pair = (c.client_host, c.server_host)
        if pair not in paths:
            paths[pair] = topology.enforcers(*pair)
        if any(e.node == node and (hook is None or e.hook == hook) for e in paths[pair]):
            chosen.append(c)
    return chosen


def _admitted(topology: Topology, checks: list[Check], node: str | None) -> list[Check]:
    """The checks `node` needs an accept for: what it forwards (firewall node) or receives (host)."""
    node = _node(topology, node)
    return enforced(topology, checks, node, "forward" if topology.is_firewall(node) else "input")


def grouped(topology: Topology, checks: list[Check], node: str | None = None):
    """(src address, dst address, transport, port|None) -> flow ids of the accepts `node` needs, in a stable order.

    `node` defaults to the first firewall node: there it is what the node forwards, on a host
    with a host firewall what that host receives.
    """
    groups: dict[tuple, list[str]] = defaultdict(list)
    for c in _admitted(topology, checks, node):
        key = (topology.host(c.client_host).address, topology.host(c.server_host).address,
               c.endpoint.transport, c.endpoint.port)
        if c.flow_id not in groups[key]:
            groups[key].append(c.flow_id)
    return sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], kv[0][3] or 0))


_grouped = grouped  # the name other modules used before it was public


def _ftp_servers(topology: Topology, checks: list[Check], node: str | None = None) -> list[tuple[str, int]]:
    """(server address, control port) of the FTP flows `node` sees, whose data channels need the helper."""
    return sorted({(topology.host(c.server_host).address, c.endpoint.port)
                   for c in enforced(topology, checks, node) if c.endpoint.protocol == "ftp"})


def _ftp_helpers(topology: Topology, checks: list[Check], node: str) -> tuple[list, list]:
    """Where `node` attaches the FTP helper: (prerouting, output) lists of (server address, port).

    Connections a node forwards or receives pass prerouting; those its own host opens pass output.
    """
    if topology.is_firewall(node):
        return _ftp_servers(topology, checks, node), []
    incoming = {(topology.host(c.server_host).address, c.endpoint.port)
                for c in enforced(topology, checks, node, "input") if c.endpoint.protocol == "ftp"}
    outgoing = {(topology.host(c.server_host).address, c.endpoint.port)
                for c in enforced(topology, checks, node, "output") if c.endpoint.protocol == "ftp"}
    return sorted(incoming), sorted(outgoing)


def _comment(flow_ids: list[str]) -> str:
    text = " ".join(flow_ids)
    return text if len(text) <= 200 else text[:197] + "..."


def generate(topology: Topology, checks: list[Check], fmt: str = "iptables", node: str | None = None) -> Ruleset:
    """Stateful, default-drop ruleset for one node allowing exactly the catalog flows that node sees.

    `node` defaults to the first firewall node. For a firewall node: FORWARD accepts for the
    required flows it routes. For a host with a host firewall: INPUT accepts for the required
    flows it serves, OUTPUT open. Only 'required' checks produce accepts.

    FTP data channels (the catalog's 1024-65535 ranges) are admitted as RELATED through the
    kernel's FTP conntrack helper instead of opening the whole range: least privilege.
    """
    node = _node(topology, node)
    if fmt not in FORMATS:
        raise LabError(f"unknown rules format {fmt!r}; use one of {', '.join(FORMATS)}")
    single = topology.filtering_nodes == (node,)
    what = (f"topology {topology.name}" if single else
            f"{'firewall node' if topology.is_firewall(node) else 'host firewall of'} {node} in topology {topology.name}")
    text = (_generate_iptables if fmt == "iptables" else _generate_nft)(topology, checks, node, what)
    return Ruleset(fmt, text, f"generated for {what}")


def _generate_iptables(topology: Topology, checks: list[Check], node: str, what: str) -> str:
    chain = "FORWARD" if topology.is_firewall(node) else "INPUT"
    prerouting, output = _ftp_helpers(topology, checks, node)
    lines = [f"# safeq-lab least-privilege ruleset for {what} (iptables-restore format)",
             "*raw", ":PREROUTING ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    for hook, helpers in (("PREROUTING", prerouting), ("OUTPUT", output)):
        for address, port in helpers:
            lines.append(f"-A {hook} -d {address}/32 -p tcp -m tcp --dport {port} "
                         f"-m comment --comment \"ftp data channels via conntrack helper\" -j CT --helper ftp")
    base, chains = _layout(topology, checks, node)
    lines += ["COMMIT", "*filter", ":INPUT DROP [0:0]", ":FORWARD DROP [0:0]", ":OUTPUT ACCEPT [0:0]",
              *(f":{name} - [0:0]" for name in chains),
              "-A INPUT -i lo -j ACCEPT",
              "-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"]
    if chain == "FORWARD":
        lines.append("-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT")
    for name, rules in ((chain, base), *chains.items()):
        lines += [f"-A {name} {_iptables_rule(rule)}" for rule in rules]
    lines += ["COMMIT", ""]
    return "\n".join(lines)


def _iptables_rule(rule: _Accept | _Jump) -> str:
    if isinstance(rule, _Jump):
        return f"{'-s' if rule.field == 'src' else '-d'} {rule.block} -j {rule.chain}"
    match = ("-p icmp -m icmp --icmp-type 8" if rule.transport == "icmp"
             else f"-p {rule.transport} -m {rule.transport} --dport {rule.port}")
    return (f"-s {rule.src}/32 -d {rule.dst}/32 {match} -m conntrack --ctstate NEW "
            f"-m comment --comment \"{_comment(rule.flow_ids)}\" -j ACCEPT")


def _generate_nft(topology: Topology, checks: list[Check], node: str, what: str) -> str:
    chain = "forward" if topology.is_firewall(node) else "input"
    lines = [f"# safeq-lab least-privilege ruleset for {what} (nft -f format)",
             "table inet safeq_lab {"]
    prerouting, output = _ftp_helpers(topology, checks, node)
    if prerouting or output:
        lines.append('  ct helper ftp_helper { type "ftp" protocol tcp; }')
    # the helper is attached after conntrack has seen the packet (priority filter, not raw)
    for hook, helpers in (("prerouting", prerouting), ("output", output)):
        if helpers:
            lines += [f"  chain {hook} {{", f"    type filter hook {hook} priority filter; policy accept;"]
            lines += [f"    ip daddr {a} tcp dport {p} ct helper set \"ftp_helper\" comment \"ftp data channels via conntrack helper\""
                      for a, p in helpers]
            lines.append("  }")
    base, chains = _layout(topology, checks, node)
    accepts = [f"    {_nft_rule(rule)}" for rule in base]
    lines += ["  chain input {", "    type filter hook input priority filter; policy drop;",
              "    iif lo accept", "    ct state established,related accept"]
    lines += accepts if chain == "input" else []
    lines += ["  }", "  chain forward {", "    type filter hook forward priority filter; policy drop;"]
    if chain == "forward":
        lines += ["    ct state established,related accept"] + accepts
    lines.append("  }")
    for name, rules in chains.items():
        lines += [f"  chain {name} {{", *(f"    {_nft_rule(rule)}" for rule in rules), "  }"]
    lines += ["}", ""]
    return "\n".join(lines)


def _nft_rule(rule: _Accept | _Jump) -> str:
    if isinstance(rule, _Jump):
        return f"ip {'saddr' if rule.field == 'src' else 'daddr'} {rule.block.removesuffix('/32')} jump {rule.chain}"
    match = "icmp type echo-request" if rule.transport == "icmp" else f"{rule.transport} dport {rule.port}"
    return f"ip saddr {rule.src} ip daddr {rule.dst} {match} ct state new accept comment \"{_comment(rule.flow_ids)}\""


# The kernel matches a packet against a chain's rules one by one. A flat FORWARD chain with one
# accept per flow makes every new connection (and every exposure knock) walk hundreds to tens of
# thousands of rules; structured as an administrator would, a packet walks a few dozen: FORWARD
# jumps on the source (an address block when there are many sources, down to one chain per
# source host), and a source host with many accepts jumps on the destination the same way.
CHAIN_FANOUT = 8  # jumps (or single accepts) a dispatching chain lists before it splits into address blocks
HOST_ACCEPTS = 16  # accepts a source host's chain lists before it dispatches on the destination
CHAIN_NAME_MAX = 28  # iptables' limit for a chain name


@dataclass(frozen=True)
class _Accept:
    src: str
    dst: str
    transport: str
    port: int | None
    flow_ids: tuple[str, ...]


@dataclass(frozen=True)
class _Jump:
    field: str  # 'src' | 'dst': the address the jump matches
    block: str  # CIDR
    chain: str


class _Chains(dict):
    """User chain name -> rules, in the order they are made; names are valid and unique."""

    def add(self, wanted: str, rules: list) -> str:
        """Add a chain named after `wanted` (host names' `-` as `_`, which nft needs unquoted)."""
        plain = re.sub(r"[^A-Za-z0-9_]", "_", wanted)
        name, number = plain[:CHAIN_NAME_MAX], 1
        while name in self:  # a long name cut short, or a host named like a zone
            number += 1
            name = plain[:CHAIN_NAME_MAX - len(f"_{number}")] + f"_{number}"
        self[name] = rules
        return name


def _block_name(network: ipaddress.IPv4Network, zones: dict) -> str:
    return zones.get(network) or f"{network.network_address}_{network.prefixlen}".replace(".", "_")


def _dispatch(entries: list[tuple[ipaddress.IPv4Address, list]], field: str, name: str, zones: dict,
              chains: _Chains) -> list:
    """The rules that send a packet to its entry's rules (one rule each) by its `field` address.

    Up to CHAIN_FANOUT entries are listed as they are; more are split by zone (when they are in
    several), else into the longest address blocks that make at most CHAIN_FANOUT of them; each
    zone or block with more than one entry is a chain of its own (`name` plus the zone or block),
    split again the same way.
    """
    if len(entries) <= CHAIN_FANOUT:
        return [rule for _address, rules in entries for rule in rules]
    dispatched = []
    for network, members in _blocks(entries, zones).items():
        if len(members) == 1:
            dispatched += members[0][1]
        else:
            chain = chains.add(f"{name}_{_block_name(network, zones)}", [])
            chains[chain] = _dispatch(members, field, name, zones, chains)
            dispatched.append(_Jump(field, str(network), chain))
    return dispatched


def _blocks(entries: list[tuple[ipaddress.IPv4Address, list]], zones: dict) -> dict:
    """Address block -> its entries: the zones when the entries are in several, else the longest
    blocks that make at most CHAIN_FANOUT (entries sorted by address)."""
    by_zone = defaultdict(list)
    for entry in entries:
        zone = next((subnet for subnet in zones if entry[0] in subnet), None)
        by_zone[zone].append(entry)
    if None not in by_zone and 1 < len(by_zone) <= CHAIN_FANOUT:
        return by_zone
    low, high = int(entries[0][0]), int(entries[-1][0])
    length = 32 - (low ^ high).bit_length()
    blocks: dict = {}
    while True:  # the members of a longer block are never more than those of a shorter one
        longer = defaultdict(list)
        for entry in entries:
            longer[ipaddress.ip_network(f"{entry[0]}/{length + 1}", strict=False)].append(entry)
        if len(longer) > CHAIN_FANOUT:
            break
        blocks, length = longer, length + 1
    return blocks


def _layout(topology: Topology, checks: list[Check], node: str) -> tuple[list, _Chains]:
    """(the rules of the node's base chain, its user chains): the accepts `node` needs, structured.

    A host firewall's few accepts stay in its INPUT chain as they are.
    """
    accepts = [_Accept(src, dst, transport, port, tuple(flow_ids))
               for (src, dst, transport, port), flow_ids in grouped(topology, checks, node)]
    chains = _Chains()
    if not topology.is_firewall(node):
        return accepts, chains
    names = {h.address: h.name for h in topology.hosts}
    zones = {zone.subnet: zone.name for zone in topology.zones}
    by_source: dict[str, list[_Accept]] = defaultdict(list)
    for accept in accepts:
        by_source[accept.src].append(accept)
    sources = []
    for src, own in by_source.items():
        host = names.get(src, src)
        chain = chains.add(f"from_{host}", [])
        chains[chain] = own if len(own) <= HOST_ACCEPTS else _by_destination(host, own, names, zones, chains)
        sources.append((ipaddress.ip_address(src), [_Jump("src", f"{src}/32", chain)]))
    return _dispatch(sorted(sources, key=lambda e: e[0]), "src", "from", zones, chains), chains


def _by_destination(host: str, accepts: list[_Accept], names: dict, zones: dict, chains: _Chains) -> list:
    """A source host's many accepts, dispatched on the destination (one chain per destination host)."""
    by_destination: dict[str, list[_Accept]] = defaultdict(list)
    for accept in accepts:
        by_destination[accept.dst].append(accept)
    entries = []
    for dst, own in by_destination.items():
        if len(own) > 1:
            chain = chains.add(f"{host}_to_{names.get(dst, dst)}", own)
            own = [_Jump("dst", f"{dst}/32", chain)]
        entries.append((ipaddress.ip_address(dst), own))
    return _dispatch(sorted(entries, key=lambda e: e[0]), "dst", f"{host}_to", zones, chains)


def walked_at_most(topology: Topology, checks: list[Check], node: str | None = None) -> tuple[int, int]:
    """(accepts, the most rules a new packet is matched against) in `node`'s generated filter chain.

    A packet no accept admits walks every rule of each chain it enters; it enters at most one
    chain per dispatching chain (the jumps match disjoint addresses). The stateful accept first counts.
    """
    node = _node(topology, node)
    base, chains = _layout(topology, checks, node)
    accepts = sum(isinstance(rule, _Accept) for rules in (base, *chains.values()) for rule in rules)

    def walk(rules: list) -> int:
        return len(rules) + max((walk(chains[r.chain]) for r in rules if isinstance(r, _Jump)), default=0)
    return accepts, 1 + walk(base)


def detect_format(text: str) -> str:
    for line in text.lstrip("\ufeff").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("*") or stripped.startswith(":") or stripped.startswith("-A "):
            return "iptables"
        if stripped.split()[0] in ("table", "flush", "add", "define", "include"):
            return "nft"
        break
    return "unknown"


def translates_addresses(ruleset: Ruleset) -> bool:
    """True when the ruleset has NAT rules (an iptables *nat table with rules, an nft nat chain).

    Allowed: a site firewall may translate. The audit then sees it: a server logging another
    source address than the client's makes the flow BROKEN (NAT/proxy).
    """
    if ruleset.format == "iptables":
        table = None
        for line in ruleset.text.splitlines():
            line = line.strip()
            if line.startswith("*"):
                table = line[1:]
            elif table == "nat" and line.startswith(("-A ", "-I ")):
                return True
        return False
    return bool(re.search(r"\btype\s+nat\b", ruleset.text))


def node_interfaces(topology: Topology, node: str | None = None) -> tuple[str, ...]:
    """The interface names a node's ruleset may name with nft `iif`/`oif` (which need them to exist).

    A firewall node has `<node>-<zone>` per zone (and `<node>-transit`), a host `<host>-eth0`;
    `node=None`: every interface of the topology's nodes (`rules check` without `--node`).
    """
    names = ["lo"]
    for fw in topology.firewalls:
        if node in (None, fw.name):
            names += [topology.firewall_interface(zone) for zone in fw.zones]
            if topology.transit is not None:
                names.append(fw.transit_interface)
    names += [f"{h.name}-eth0" for h in topology.hosts if node in (None, h.name)]
    return tuple(names)


MAX_RULES_BYTES = 8 * 1024 * 1024  # a large site's iptables-save is a few MiB
RULES_FILE = userfile.Expected(
    label="rules file {path}:", what="a ruleset", give="an iptables-save or nft ruleset", max_bytes=MAX_RULES_BYTES,
    when_empty="give an iptables-save or nft ruleset (`safeq-lab rules generate` writes one to start from)",
    encoding_fix="give an iptables-save or nft ruleset saved as UTF-8")
# nft's `iif`/`oif` (not `iifname`/`oifname`) resolve the name to an index when loading: it must exist
_NFT_INTERFACE = re.compile(r'\b(?:iif|oif)\s+(?:(?:!=|==|vmap|map)\s+)?(\{[^}]*\}|"[^"]*"|[^\s;{}]+)')
_NFT_COMMENT = re.compile(r'\bcomment\s+"[^"]*"')


def _interfaces_named(text: str) -> list[tuple[int, str]]:
    """(line, name) for every interface named by an nft `iif`/`oif` match; variables ($x) are skipped."""
    named = []
    for number, line in enumerate(text.splitlines(), 1):
        code = _NFT_COMMENT.sub("", line).split("#", 1)[0]
        for match in _NFT_INTERFACE.finditer(code):
            for element in match.group(1).strip("{}").split(","):
                item = element.split(":", 1)[0].strip().strip('"')
                if item and not item.startswith("$") and not item.isdigit():
                    named.append((number, item))
    return named


def load_rules_file(path_text: str, interfaces: tuple[str, ...] | None = None, owner: str = "") -> Ruleset:
    """Read and validate a user's ruleset file; errors name the file (and line) and the fix.

    `interfaces`: the interfaces of the node it is for (`node_interfaces`), described by `owner`;
    an nft `iif`/`oif` naming another is refused. None: any name the file gives is accepted.
    """
    path = Path(path_text)
    if not path.exists():
        raise LabError(f"rules file {path} does not exist; give the path of an iptables-save or nft ruleset")
    if not path.is_file():
        raise LabError(f"rules file {path} is not a regular file; give the path of an iptables-save or nft ruleset")
    text = userfile.read_text(path, RULES_FILE)
    if "\x00" in text:
        line = text[:text.index("\x00")].count("\n") + 1
        raise LabError(f"rules file {path}: not readable text (line {line}: a NUL byte); "
                       "give an iptables-save or nft ruleset")
    fmt = detect_format(text)
    if fmt == "unknown":
        raise LabError(f"rules file {path} is neither an iptables-save ruleset (*filter ... COMMIT) nor an nft ruleset (table ...)")
    if fmt == "iptables" and "COMMIT" not in text:
        raise LabError(f"rules file {path}: iptables-save ruleset without COMMIT; each table (*filter, *raw, ...) must end with COMMIT")
    ruleset = Ruleset(fmt, text, str(path))
    validate(ruleset, interfaces, owner)
    return ruleset


def _tool(name: str, package: str) -> str:
    found = shutil.which(name)
    if not found:
        raise LabError(f"{name} is missing; install it with `apt-get install {package}` (or run ./setup.sh)")
    return found


# Runs in the throwaway namespace: create each named interface (a dummy, or a bridge where the
# kernel has no dummy driver), then exec the loader. Names come as arguments, never as code.
_WITH_INTERFACES = ('for name in "$@"; do ip link add "$name" type dummy 2>/dev/null '
                    '|| ip link add "$name" type bridge || exit 97; done; exec {command}')
_NO_INTERFACE = 97
VALIDATE_TIMEOUT = 60  # seconds


def validate(ruleset: Ruleset, interfaces: tuple[str, ...] | None = None, owner: str = "") -> None:
    """Load the ruleset for real, inside a fresh network namespace that dies with the command.

    A real load, not `--test`: iptables-nft's test mode accepts jumps to chains that do not exist.
    nft's `iif`/`oif` need the interface to exist, so the namespace gets the node's interfaces
    (`interfaces`; None: the ones the ruleset names) as dummies first. Whatever the ruleset does
    (`flush ruleset` included) stays in that namespace.
    """
    named = _interfaces_named(ruleset.text) if ruleset.format == "nft" else []
    if interfaces is not None:
        for line, name in named:
            if name not in interfaces:
                listed = [i for i in interfaces if not i.endswith("-eth0")]
                listed += ["<host>-eth0"] if len(listed) < len(interfaces) - 1 else [i for i in interfaces if i.endswith("-eth0")]
                raise LabError(f"rules file {ruleset.source} line {line}: {name!r} is not an interface of "
                               f"{owner or 'the node'} ({', '.join(listed)}); use one of these, or "
                               "`iifname`/`oifname` for a name that may not exist")
    if os.geteuid() != 0:
        raise LabError("checking a ruleset needs root (it is loaded into a throwaway network namespace): run it with sudo")
    if interfaces is not None:
        create = [name for name in interfaces if name != "lo"] if named else []
    else:
        create = sorted({name for _line, name in named if _valid_interface_name(name) and name != "lo"})
    if ruleset.format == "iptables":
        command = [_tool("iptables-restore", "iptables")]
    else:
        command = [_tool("nft", "nftables"), "-f", "-"]
    if create:
        script = _WITH_INTERFACES.format(command=" ".join(shlex.quote(part) for part in command))
        command = [_tool("sh", "dash"), "-c", script, "safeq-lab-check", *create]
        _tool("ip", "iproute2")
    try:
        proc = subprocess.run([_tool("unshare", "util-linux"), "--net", *command], input=ruleset.text,
                              capture_output=True, text=True, timeout=VALIDATE_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise LabError(f"rules file {ruleset.source}: loading it took over {VALIDATE_TIMEOUT} s in a throwaway "
                       "namespace; give a smaller ruleset") from None
    if proc.returncode == _NO_INTERFACE and create:
        raise LabError(f"could not create the interfaces {', '.join(create)} in a throwaway namespace to check "
                       f"{ruleset.source} ({' '.join(proc.stderr.split())[:200]}); is iproute2 installed?")
    if proc.returncode != 0:
        said = [re.sub(r"^/dev/stdin:(\d+):\S*", r"line \1:", " ".join(l.split()))
                for l in (proc.stderr or proc.stdout).splitlines()
                if l.strip() and not l.startswith("Try `") and not set(l.strip()) <= {"^", "~"}]
        raise LabError(f"rules file {ruleset.source} is not a valid {ruleset.format} ruleset: "
                       f"{'; '.join(said)[:300] or 'rejected'}; fix that and check again with `safeq-lab rules check`")


def _valid_interface_name(name: str) -> bool:
    return 0 < len(name) <= INTERFACE_MAX and "/" not in name and not any(c.isspace() for c in name)


def apply_commands(ruleset: Ruleset) -> list[tuple[list[str], str | None]]:
    """Commands (argv, stdin) that replace the firewall node's whole ruleset with this one."""
    reset = [(["nft", "flush", "ruleset"], None)] if shutil.which("nft") else []
    if ruleset.format == "iptables":
        return reset + [(["iptables-restore"], ruleset.text)]
    return reset + [(["nft", "-f", "-"], ruleset.text)]
