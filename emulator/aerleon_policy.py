"""Our least-privilege policy as Aerleon files (definitions + YAML policy), rendered by Aerleon itself.

Pure text in, text out: no Mininet, no root. `policy_files` writes what a network team drops into its
Aerleon tree; `render` runs Aerleon's Python API (`aerleon.api.Generate`) on those files; `to_ruleset`
makes a rendering loadable by the lab and adds the one thing Aerleon cannot say, the FTP conntrack helper.

Reproduce by hand, in a directory holding the files:
    aclgen --base_directory=. --definitions_directory=def --policy_file=pol/safeq-lab.yaml --output_directory=out
"""
from __future__ import annotations

import hashlib
import ipaddress
import re
import tempfile
from importlib import metadata
from pathlib import Path

import yaml

from emulator import rules
from emulator.errors import LabError
from emulator.plan import Check
from emulator.topology import Topology

try:  # optional at import time: only this export needs Aerleon, and its absence must be a LabError
    from aerleon import api as aerleon_api
    from aerleon.lib import naming as aerleon_naming
except ImportError:
    aerleon_api = aerleon_naming = None

NETWORKS_FILE = "def/networks.yaml"
SERVICES_FILE = "def/services.yaml"
POLICY_FILE = "pol/safeq-lab.yaml"
HELPERS_FILE = "conntrack-helpers.yaml"  # ours, not Aerleon's: see _helpers_text

# Aerleon target -> the header options of our one filter: a stateful, default-drop forward filter.
HEADERS = {
    "iptables": "FORWARD DROP",  # filter table, FORWARD chain, policy DROP; stateful unless 'nostate'
    "nftables": "mixed forward",  # Aerleon's 'mixed' is nft's dual-stack `inet` table; hook forward
}
TARGETS = tuple(HEADERS)
RULESET_FORMAT = {"iptables": "iptables", "nftables": "nft"}  # Aerleon target -> rules.Ruleset format

TERM_NAME_MAX = 24  # Aerleon's iptables limit (it prefixes 'F_' to make the chain name)
COMMENT_MAX = 128  # nft: one comment per chain, at most 128 characters
FTP_HELPER_COMMENT = "ftp data channels via conntrack helper"  # the text rules.py gives the same rules
REGENERATE = "regenerate them with `safeq-lab rules generate --format aerleon`"


def policy_files(topology: Topology, checks: list[Check], targets=TARGETS) -> dict[str, str]:
    """File name -> text: network and service definitions and the policy, plus our helper list.

    One term per (client host, server host, service) of required checks crossing the firewall,
    grouped exactly as rules.generate groups them, then a final deny.
    """
    targets = tuple(targets)
    unknown = [t for t in targets if t not in HEADERS]
    if unknown or not targets:
        raise LabError(f"unknown Aerleon target(s) {', '.join(unknown)}; use {' or '.join(TARGETS)}" if unknown
                       else f"no Aerleon target given; use {' or '.join(TARGETS)}")
    by_address = {h.address: h for h in topology.hosts}
    groups = rules.grouped(topology, checks)
    return {
        NETWORKS_FILE: _networks_text(topology),
        SERVICES_FILE: _services_text(topology, groups),
        POLICY_FILE: _policy_text(topology, groups, by_address, targets),
        HELPERS_FILE: _helpers_text(topology, checks),
    }


def network_name(host_or_zone: str, kind: str = "HOST") -> str:
    """`mfd-km` -> HOST_MFD_KM; zones are ZONE_<NAME>. Host and zone names allow no '_', so no clashes."""
    return f"{kind}_{host_or_zone.upper().replace('-', '_')}"


def service_name(transport: str, port: int) -> str:
    return f"{transport.upper()}_{port}"


def term_name(client: str, server: str, transport: str, port: int | None) -> str:
    """Readable and unique; a name over Aerleon's 24-character limit keeps a stable hash suffix."""
    name = f"{client}-{server}-{transport}{port or ''}"
    if len(name) <= TERM_NAME_MAX:
        return name
    return f"{name[:TERM_NAME_MAX - 7]}-{hashlib.sha256(name.encode()).hexdigest()[:6]}"


def _comment(text: str) -> str:
    return text if len(text) <= COMMENT_MAX else text[:COMMENT_MAX - 3] + "..."


def _dump(preamble: list[str], data) -> str:
    head = "".join(f"# {line}\n" if line else "#\n" for line in preamble)
    return head + yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=1000)


def _networks_text(topology: Topology) -> str:
    networks = {}
    for zone in topology.zones:
        networks[network_name(zone.name, "ZONE")] = {
            "values": [{"address": str(zone.subnet), "comment": f"zone {zone.name}"}]}
        for host in zone.hosts:
            networks[network_name(host.name)] = {
                "values": [{"address": f"{host.address}/32",
                            "comment": f"{host.name} ({zone.name}): {', '.join(host.roles)}"}]}
    return _dump([f"safeq-lab topology {topology.name}: one name per host address and per zone subnet."],
                 {"networks": networks})


def _services_text(topology: Topology, groups) -> str:
    ports = sorted({(transport, port) for (_s, _d, transport, port), _ids in groups if port is not None})
    services = {service_name(t, p): [{"port": p, "protocol": t}] for t, p in ports}
    return _dump([f"safeq-lab topology {topology.name}: every (transport, port) a required flow uses across the firewall."],
                 {"services": services})


def _policy_text(topology: Topology, groups, by_address, targets) -> str:
    terms = []
    if "iptables" in targets:
        # nftables puts `ct state established,related accept` in its base chain itself; Aerleon's
        # iptables admits only each term's own direction, so replies need this term. Stateless
        # platforms reject it, hence the platform restriction.
        terms.append({"name": "established", "comment": "replies and RELATED traffic (FTP data) of accepted connections",
                      "option": "established", "platform": "iptables", "action": "accept"})
    for (src, dst, transport, port), flow_ids in groups:
        client, server = by_address[src].name, by_address[dst].name
        term = {"name": term_name(client, server, transport, port),
                "comment": _comment(" ".join(flow_ids)),
                "source-address": network_name(client), "destination-address": network_name(server),
                "protocol": transport}
        if transport == "icmp":
            # Aerleon 1.18's nftables generator crashes on a single icmp-type (nftables.Add gets a
            # list); a repeated type renders as one set element, and as one duplicate rule elsewhere.
            term["icmp-type"] = "echo-request echo-request" if "nftables" in targets else "echo-request"
        else:
            term["destination-port"] = service_name(transport, port)
        term["action"] = "accept"
        terms.append(term)
    terms.append({"name": "default-deny", "comment": "everything no catalog flow needs", "action": "deny"})
    header = {"comment": _comment(f"safeq-lab least-privilege policy for topology {topology.name}"),
              "targets": {t: HEADERS[t] for t in targets}}
    preamble = [f"safeq-lab least-privilege policy for topology {topology.name}, from the audit plan.",
                "Each term's comment lists the catalog flows it serves (`safeq-lab catalog` explains them).",
                f"FTP data channels also need the kernel FTP conntrack helper: see {HELPERS_FILE}."]
    return _dump(preamble, {"filters": [{"header": header, "terms": terms}]})


def _helpers_text(topology: Topology, checks: list[Check]) -> str:
    servers = [{"address": address, "port": port} for address, port in rules._ftp_servers(topology, checks)]
    preamble = ["Not an Aerleon file: Aerleon cannot attach a conntrack helper.",
                "Connections to these FTP control ports need the kernel's FTP helper (nf_conntrack_ftp),",
                "so that their data channels are RELATED and pass the established rule, instead of",
                "opening the catalog's 1024-65535 data ranges. safeq-lab adds these rules itself."]
    return _dump(preamble, {"ftp": servers})


# -- rendering ---------------------------------------------------------------------------------

def aerleon_version() -> str:
    if aerleon_api is None:
        raise LabError("Aerleon is not installed: `pip install aerleon` (or `pip install -e .`) in safeq-lab's virtualenv")
    return metadata.version("aerleon")


def render(files: dict[str, str], target: str) -> str:
    """Aerleon's own rendering of the policy for one target, the text aclgen would write."""
    version = aerleon_version()
    if target not in TARGETS:
        raise LabError(f"unknown Aerleon target {target!r}; use {' or '.join(TARGETS)}")
    missing = [name for name in (NETWORKS_FILE, SERVICES_FILE, POLICY_FILE) if name not in files]
    if missing:
        raise LabError(f"Aerleon files lack {', '.join(missing)}; {REGENERATE}")
    try:
        policy = yaml.safe_load(files[POLICY_FILE])
        filters = policy["filters"]
        headers = [f["header"]["targets"] for f in filters]
    except (yaml.YAMLError, TypeError, KeyError) as exc:
        raise LabError(f"{POLICY_FILE} is not an Aerleon YAML policy with filters, headers and targets "
                       f"({exc.__class__.__name__}); {REGENERATE}") from None
    if not any(target in h for h in headers):
        raise LabError(f"{POLICY_FILE} has no {target} header; regenerate the files with {target} among the targets")
    for header in headers:  # render this target only (the policy was just parsed: ours to change)
        for other in [t for t in header if t != target]:
            del header[other]
    policy["filename"] = Path(POLICY_FILE).stem
    with tempfile.TemporaryDirectory(prefix="safeq-lab-aerleon-") as tmp:
        base = Path(tmp)
        for name, text in files.items():
            (base / name).parent.mkdir(parents=True, exist_ok=True)
            (base / name).write_text(text)
        try:
            definitions = aerleon_naming.Naming(str(base / Path(NETWORKS_FILE).parent))
            outputs = aerleon_api.Generate([policy], definitions, include_path=base / Path(POLICY_FILE).parent)
        except Exception as exc:  # only Aerleon runs here: its errors and its crashes alike
            raise LabError(f"Aerleon {version} could not render {POLICY_FILE} for {target} "
                           f"({_one_line(exc)}); fix the files or {REGENERATE}") from None
    texts = [text for text in (outputs or {}).values() if text.strip()]
    if len(texts) != 1:
        raise LabError(f"Aerleon {version} rendered {len(texts)} outputs for {target} instead of one; "
                       f"check {POLICY_FILE}'s header targets")
    return texts[0]


def _one_line(exc: Exception) -> str:
    """Aerleon's multi-line message, on one line, its embedded `<class 'a.b.Error'>` as `Error:`."""
    text = re.sub(r"<class '(?:\w+\.)*(\w+)'>\s*", r"\1: ", " ".join(str(exc).split()))
    return f"{exc.__class__.__name__}: {text}"[:300]


def ftp_helpers(files: dict[str, str]) -> list[tuple[str, int]]:
    """(address, port) of the FTP servers whose control connections get the conntrack helper."""
    if HELPERS_FILE not in files:
        raise LabError(f"Aerleon files lack {HELPERS_FILE} (FTP conntrack helpers); {REGENERATE}")
    try:
        data = yaml.safe_load(files[HELPERS_FILE])
    except yaml.YAMLError:
        raise LabError(f"{HELPERS_FILE}: not valid YAML; {REGENERATE}") from None
    if not isinstance(data, dict) or set(data) != {"ftp"} or not isinstance(data["ftp"], list):
        raise LabError(f"{HELPERS_FILE}: expected one key, ftp, holding a list of {{address, port}}")
    servers = []
    for i, item in enumerate(data["ftp"]):
        where = f"{HELPERS_FILE}: ftp[{i}]"
        if not isinstance(item, dict) or set(item) != {"address", "port"}:
            raise LabError(f"{where}: expected exactly the keys address and port")
        try:
            address = ipaddress.IPv4Address(str(item["address"]))
        except ValueError:
            raise LabError(f"{where}.address: {item['address']!r} is not an IPv4 address") from None
        port = item["port"]
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise LabError(f"{where}.port: {port!r} is not a port number (1-65535)")
        servers.append((str(address), port))
    return servers


def to_ruleset(files: dict[str, str], target: str) -> rules.Ruleset:
    """The Aerleon rendering as a ruleset the lab loads, plus the FTP helper rules Aerleon cannot express.

    iptables: Aerleon writes bare `-P/-N/-A` lines; wrapped in *filter ... COMMIT they are
    iptables-restore input. nftables: Aerleon writes a whole `nft -f` file.
    Either way the FTP helper rules are the ones rules.generate writes, appended here.
    """
    text = render(files, target)
    servers = ftp_helpers(files)
    lines = [f"# safeq-lab: Aerleon {aerleon_version()} rendering of {POLICY_FILE} for {target}, "
             f"with the FTP conntrack helper appended (Aerleon cannot express it)"]
    if target == "iptables":
        lines += ["*filter", text.rstrip("\n"), "COMMIT"]
        if servers:
            lines += ["*raw", ":PREROUTING ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
            lines += [f"-A PREROUTING -d {address}/32 -p tcp -m tcp --dport {port} "
                      f"-m comment --comment \"{FTP_HELPER_COMMENT}\" -j CT --helper ftp" for address, port in servers]
            lines.append("COMMIT")
    else:
        lines.append(text.rstrip("\n"))
        if servers:
            # a table of its own, so Aerleon's table stays exactly as rendered; the helper is
            # attached after conntrack has seen the packet (priority filter), as in rules.py
            lines += ["table inet safeq_lab_helpers {", '  ct helper ftp_helper { type "ftp" protocol tcp; }',
                      "  chain prerouting {", "    type filter hook prerouting priority filter; policy accept;"]
            lines += [f"    ip daddr {address} tcp dport {port} ct helper set \"ftp_helper\" comment \"{FTP_HELPER_COMMENT}\""
                      for address, port in servers]
            lines += ["  }", "}"]
    return rules.Ruleset(RULESET_FORMAT[target], "\n".join(lines) + "\n",
                         f"Aerleon {aerleon_version()} {target} rendering of the least-privilege policy")
