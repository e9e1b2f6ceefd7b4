"""Firewall rulesets: the least-privilege ruleset a topology needs, and users' own rule files.

Generation is pure text from the audit plan; validation runs the real tools in a throwaway
network namespace (`unshare --net`), so the host's own rules are never touched.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from emulator.errors import LabError
from emulator.plan import Check
from emulator.topology import Topology

FORMATS = ("iptables", "nft")


@dataclass(frozen=True)
class Ruleset:
    format: str  # 'iptables' (iptables-save / iptables-restore) | 'nft'
    text: str
    source: str  # where it came from, for messages and reports

    def __post_init__(self):
        if self.format not in FORMATS:
            raise LabError(f"unknown rules format {self.format!r}; use one of {', '.join(FORMATS)}")


def _crossing(topology: Topology, checks: list[Check]) -> list[Check]:
    """Required checks whose traffic crosses the firewall (client and server in different zones)."""
    return [c for c in checks if c.kind == "required"
            and topology.host(c.client_host).zone != topology.host(c.server_host).zone]


def _grouped(topology: Topology, checks: list[Check]):
    """(src address, dst address, transport, port|None) -> flow ids, in a stable order."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    for c in _crossing(topology, checks):
        key = (topology.host(c.client_host).address, topology.host(c.server_host).address,
               c.endpoint.transport, c.endpoint.port)
        if c.flow_id not in groups[key]:
            groups[key].append(c.flow_id)
    return sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], kv[0][3] or 0))


def _ftp_servers(topology: Topology, checks: list[Check]) -> list[tuple[str, int]]:
    return sorted({(topology.host(c.server_host).address, c.endpoint.port)
                   for c in _crossing(topology, checks) if c.endpoint.protocol == "ftp"})


def _comment(flow_ids: list[str]) -> str:
    text = " ".join(flow_ids)
    return text if len(text) <= 200 else text[:197] + "..."


def generate(topology: Topology, checks: list[Check], fmt: str = "iptables") -> Ruleset:
    """Stateful, default-drop ruleset allowing exactly the catalog flows between zones.

    FTP data channels (the catalog's 1024-65535 ranges) are admitted as RELATED through the
    kernel's FTP conntrack helper instead of opening the whole range: least privilege.
    """
    if fmt == "iptables":
        text = _generate_iptables(topology, checks)
    elif fmt == "nft":
        text = _generate_nft(topology, checks)
    else:
        raise LabError(f"unknown rules format {fmt!r}; use one of {', '.join(FORMATS)}")
    return Ruleset(fmt, text, f"generated for topology {topology.name}")


def _generate_iptables(topology: Topology, checks: list[Check]) -> str:
    lines = [f"# safeq-lab least-privilege ruleset for topology {topology.name} (iptables-restore format)",
             "*raw", ":PREROUTING ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    for address, port in _ftp_servers(topology, checks):
        lines.append(f"-A PREROUTING -d {address}/32 -p tcp -m tcp --dport {port} "
                     f"-m comment --comment \"ftp data channels via conntrack helper\" -j CT --helper ftp")
    lines += ["COMMIT", "*filter", ":INPUT DROP [0:0]", ":FORWARD DROP [0:0]", ":OUTPUT ACCEPT [0:0]",
              "-A INPUT -i lo -j ACCEPT",
              "-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
              "-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"]
    for (src, dst, transport, port), flow_ids in _grouped(topology, checks):
        match = ("-p icmp -m icmp --icmp-type 8" if transport == "icmp"
                 else f"-p {transport} -m {transport} --dport {port}")
        lines.append(f"-A FORWARD -s {src}/32 -d {dst}/32 {match} -m conntrack --ctstate NEW "
                     f"-m comment --comment \"{_comment(flow_ids)}\" -j ACCEPT")
    lines += ["COMMIT", ""]
    return "\n".join(lines)


def _generate_nft(topology: Topology, checks: list[Check]) -> str:
    lines = [f"# safeq-lab least-privilege ruleset for topology {topology.name} (nft -f format)",
             "table inet safeq_lab {"]
    ftp = _ftp_servers(topology, checks)
    if ftp:
        # the helper is attached after conntrack has seen the packet (priority filter, not raw)
        lines += ['  ct helper ftp_helper { type "ftp" protocol tcp; }',
                  "  chain prerouting {", "    type filter hook prerouting priority filter; policy accept;"]
        lines += [f"    ip daddr {a} tcp dport {p} ct helper set \"ftp_helper\" comment \"ftp data channels via conntrack helper\""
                  for a, p in ftp]
        lines.append("  }")
    lines += ["  chain input {", "    type filter hook input priority filter; policy drop;",
              "    iif lo accept", "    ct state established,related accept", "  }",
              "  chain forward {", "    type filter hook forward priority filter; policy drop;",
              "    ct state established,related accept"]
    for (src, dst, transport, port), flow_ids in _grouped(topology, checks):
        match = "icmp type echo-request" if transport == "icmp" else f"{transport} dport {port}"
        lines.append(f"    ip saddr {src} ip daddr {dst} {match} ct state new accept comment \"{_comment(flow_ids)}\"")
    lines += ["  }", "}", ""]
    return "\n".join(lines)


def detect_format(text: str) -> str:
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("*") or stripped.startswith(":") or stripped.startswith("-A "):
            return "iptables"
        if stripped.split()[0] in ("table", "flush", "add", "define", "include"):
            return "nft"
        break
    return "unknown"


def load_rules_file(path_text: str) -> Ruleset:
    """Read and validate a user's ruleset file; errors name the file and the fix."""
    path = Path(path_text)
    if not path.is_file():
        raise LabError(f"rules file {path} does not exist")
    try:
        text = path.read_text()
    except (UnicodeDecodeError, OSError) as exc:
        raise LabError(f"rules file {path} is not readable text ({exc.__class__.__name__}); give an iptables-save or nft ruleset") from None
    fmt = detect_format(text)
    if fmt == "unknown":
        raise LabError(f"rules file {path} is neither an iptables-save ruleset (*filter ... COMMIT) nor an nft ruleset (table ...)")
    if fmt == "iptables" and "COMMIT" not in text:
        raise LabError(f"rules file {path}: iptables-save ruleset without COMMIT; each table (*filter, *raw, ...) must end with COMMIT")
    ruleset = Ruleset(fmt, text, str(path))
    validate(ruleset)
    return ruleset


def _tool(name: str, package: str) -> str:
    found = shutil.which(name)
    if not found:
        raise LabError(f"{name} is missing; install it with `apt-get install {package}` (or run ./setup.sh)")
    return found


def validate(ruleset: Ruleset) -> None:
    """Load the ruleset for real, inside a fresh network namespace that dies with the command.

    A real load, not `--test`: iptables-nft's test mode accepts jumps to chains that do not exist.
    """
    if os.geteuid() != 0:
        raise LabError("checking a ruleset needs root (it is loaded into a throwaway network namespace): run it with sudo")
    if ruleset.format == "iptables":
        command = [_tool("iptables-restore", "iptables")]
    else:
        command = [_tool("nft", "nftables"), "-f", "-"]
    proc = subprocess.run([_tool("unshare", "util-linux"), "--net", *command], input=ruleset.text,
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        said = [l.strip() for l in (proc.stderr or proc.stdout).splitlines()
                if l.strip() and not l.startswith("Try `")]
        raise LabError(f"rules file {ruleset.source} is not a valid {ruleset.format} ruleset: "
                       f"{'; '.join(said)[:300] or 'rejected'}")


def apply_commands(ruleset: Ruleset) -> list[tuple[list[str], str | None]]:
    """Commands (argv, stdin) that replace the firewall node's whole ruleset with this one."""
    reset = [(["nft", "flush", "ruleset"], None)] if shutil.which("nft") else []
    if ruleset.format == "iptables":
        return reset + [(["iptables-restore"], ruleset.text)]
    return reset + [(["nft", "-f", "-"], ruleset.text)]
