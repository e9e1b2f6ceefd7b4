"""Packet captures of an audit: the whole audit on each filtering node, then one pcap per finding.

`Capture(lab, nodes, directory)` runs `tcpdump -i any` inside each node's network namespace (a
firewall node sees every packet it forwards twice, once arriving and once leaving, and a packet it
dropped only once; a host with its own firewall sees its own traffic) from before the first probe
until `stop()`. Each tcpdump carries the run's SAFEQ_LAB_RUN mark in its environment (as every
process a lab starts, emulator.state), so `safeq-lab clean` ends one a killed run left behind;
`stop()` (also on leaving the `with` block) ends them in any other case, before the lab's teardown.
Only the lab's addresses are captured (198.18.0.0/15), each packet's first SNAPLEN bytes: the
headers and the start of every exchange, never a whole 64 KiB print job.

`write_finding_pcaps` then cuts one file per finding out of the capture of the node that decided it
(`tcpdump -r CAPTURE -w FILE FILTER`): both hosts' addresses and the check's port (and any ICMP error
between them, which carries a REJECT or an unreachable); for an FTP flow every connection between
the two hosts, data channels included.
"""
from __future__ import annotations

import os
import re
import select
import shutil
import struct
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from emulator.audit import FlowVerdict
from emulator.errors import LabError

SNAPLEN = 512
LAB_NET = "net 198.18.0.0/15"
# ICMP but echo: the REJECTs and unreachables that answer a check (a ping flow between the same hosts is not it)
ICMP_ERRORS = "icmp and icmp[icmptype] != icmp-echo and icmp[icmptype] != icmp-echoreply"
BUFFER_KIB = 16384  # the kernel's capture buffer per tcpdump (-B): a sweep sends tens of thousands of knocks
START_TIMEOUT = 10.0  # for tcpdump to say it listens
STOP_TIMEOUT = 10.0
READ_TIMEOUT = 60.0  # one `tcpdump -r` over a node's capture
MAX_FINDING_PCAPS = 500  # a ruleset that blocks everything has thousands of findings: cut the first ones
_DROPPED = re.compile(r"(\d+) packets? dropped by kernel")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def require_tcpdump() -> None:
    if not shutil.which("tcpdump"):
        raise LabError("--pcap needs tcpdump: run `apt-get install tcpdump`")


@dataclass
class NodeCapture:
    node: str
    path: Path
    proc: subprocess.Popen
    dropped: int = 0  # packets the kernel dropped before tcpdump read them (tcpdump's own count)


class Capture:
    """tcpdump on every interface of each node, for as long as the block runs (see the module docstring)."""

    def __init__(self, lab, nodes, directory: Path):
        self.lab = lab
        self.nodes = list(nodes)
        self.directory = Path(directory)
        self.captures: dict[str, NodeCapture] = {}

    def __enter__(self) -> "Capture":
        require_tcpdump()
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            for node in self.nodes:
                self._start(node)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def path(self, node: str) -> Path:
        return self.directory / f"{_safe(node)}.pcap"

    def _start(self, node: str) -> None:
        # Linux cooked v1: v2 records interface indexes, which tcpdump -r names from the reader's own namespace.
        # Immediate mode: else libpcap hands packets over in blocks retired after 1 s, and a block still
        # filling when stop() comes (the last knocks of a sweep) is never written
        argv = ["tcpdump", "-i", "any", "--immediate-mode", "-y", "LINUX_SLL", "-n", "-s", str(SNAPLEN), "-B", str(BUFFER_KIB), "-Z", "root",
                "-w", str(self.path(node)), LAB_NET]
        proc = self.lab.popen(node, argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        self.captures[node] = NodeCapture(node, self.path(node), proc)
        said = _await_line(proc, "listening on", START_TIMEOUT)
        if said is not None:
            raise LabError(f"tcpdump on {node} did not start: {said or 'no answer'}")

    def stop(self) -> dict[str, int]:
        """Stop every tcpdump (they write what they hold); node -> packets its kernel buffer dropped."""
        for capture in self.captures.values():
            proc = capture.proc
            if proc.poll() is None:
                proc.terminate()
            try:
                _out, err = proc.communicate(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                _out, err = proc.communicate()
            except ValueError:  # already collected by an earlier stop()
                err = ""
            match = _DROPPED.search(err or "")
            capture.dropped = capture.dropped or (int(match.group(1)) if match else 0)
        return {node: c.dropped for node, c in self.captures.items()}


def _await_line(proc: subprocess.Popen, wanted: str, timeout: float) -> str | None:
    """None once the process wrote a line containing `wanted` on stderr; else what it said (it exited, or time ran out)."""
    deadline = time.monotonic() + timeout
    said = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        line = proc.stderr.readline()
        if not line:
            break
        if wanted in line:
            return None
        said.append(line.strip())
    return "; ".join(said[-3:])


def _safe(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("_")


# -- one pcap per finding ---------------------------------------------------------------------------
def bpf_filter(v: FlowVerdict, client: str, server: str) -> str:
    """The packets of a check between two addresses: its port (and ICMP between them), or for FTP and
    ICMP checks everything the two exchange of that kind."""
    ep = v.check.endpoint
    hosts = f"host {client} and host {server}"
    if ep is None or ep.protocol == "ftp" or ep.port is None:
        return hosts
    if ep.transport == "icmp":
        return f"{hosts} and icmp"
    return f"{hosts} and (({ep.transport} port {ep.port}) or ({ICMP_ERRORS}))"


def capture_node(v: FlowVerdict) -> str:
    """The node whose capture shows a finding best: the one that decided it, else the first on its path."""
    return v.node or (v.check.enforcers[0].node if v.check.enforcers else "")


def pcap_name(index: int, v: FlowVerdict, prefix: str = "") -> str:
    c = v.check
    label = c.label.replace("/", "-").replace(" ", "-")
    return f"{prefix}{index:04d}-{_safe(str(v.verdict))}-{_safe(c.client_host or '')}-{_safe(c.server_host or '')}-{_safe(label)}.pcap"


def packet_count(path: Path) -> int:
    """Packets in a classic pcap file (what tcpdump -w writes): its record headers, walked."""
    data = path.read_bytes()
    if len(data) < 24:
        return 0
    endian = "<" if data[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    offset, count = 24, 0
    while offset + 16 <= len(data):
        (included,) = struct.unpack_from(endian + "I", data, offset + 8)
        offset += 16 + included
        count += 1
    return count


@dataclass(frozen=True)
class FindingPcap:
    name: str        # file name under the pcap directory; '' when none was written
    node: str
    packets: int
    note: str = ""   # why there is no file, or what went wrong


def write_finding_pcaps(capture: Capture, findings: list[FlowVerdict], topology, directory: Path,
                        prefix: str = "") -> dict[str, FindingPcap]:
    """One pcap per finding in `directory` (check key -> FindingPcap), cut from the capture of its node."""
    directory.mkdir(parents=True, exist_ok=True)
    addresses = {h.name: h.address for h in topology.hosts}

    def cut(item: tuple[int, FlowVerdict]) -> tuple[str, FindingPcap]:
        index, v = item
        c, node = v.check, capture_node(v)
        if index >= MAX_FINDING_PCAPS:
            return c.key, FindingPcap("", node, 0, f"not cut: only the first {MAX_FINDING_PCAPS} findings get a pcap")
        if node not in capture.captures or c.client_host not in addresses or c.server_host not in addresses:
            return c.key, FindingPcap("", node, 0, "no filtering node on its path was captured")
        name = pcap_name(index + 1, v, prefix)
        out = directory / name
        argv = ["tcpdump", "-n", "-Z", "root", "-r", str(capture.captures[node].path), "-w", str(out),
                bpf_filter(v, addresses[c.client_host], addresses[c.server_host])]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=READ_TIMEOUT)
        except subprocess.TimeoutExpired:
            return c.key, FindingPcap("", node, 0, f"tcpdump -r took over {READ_TIMEOUT:.0f}s")
        if proc.returncode != 0 or not out.exists():
            said = next((l for l in proc.stderr.splitlines() if l.strip() and "reading from" not in l), "failed")
            return c.key, FindingPcap("", node, 0, f"tcpdump -r: {said}")
        return c.key, FindingPcap(name, node, packet_count(out))

    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        return dict(pool.map(cut, enumerate(findings)))
