"""Link impairments (delay, jitter, loss, bandwidth) on transparent shaper nodes, on every Linux kernel.

An impairment never sits on a firewall under test: a user's ruleset there may flush everything.
Each impairable link gets a *shaper*: a namespace with two veths (`shfw` toward the firewall node,
`shnet` toward the zone's or the transit segment's bridge) joined by a Linux bridge (`shbr`), with
no address. Bridged IPv4 crosses the shaper's own iptables FORWARD chain (the namespace's
bridge-nf-call-iptables is 1), which is where loss and the delayer's queue sit.

Link names: a zone link is named after its zone (`servers`); a firewall node's link to the transit
segment is `wan-<node>` (`wan-bfw`). A shaper node is `sh_<link>` (a name no host can have).

Semantics (every value per direction unless said otherwise; IPv4 only, ARP is never impaired):
* ``delay_ms``: the added ROUND-TRIP time of the link; each direction holds a packet delay/2.
* ``jitter_ms``: each packet's hold is spread uniformly over delay/2 ± jitter/2 in each direction,
  without reordering (a packet never leaves before the one ahead of it), so a round trip takes
  delay ± jitter on top of the base RTT. At most ``delay_ms``.
* ``loss``: percent of packets dropped at random, in each direction (iptables `statistic`).
* ``bw``: Mbit/s in each direction (HTB on both shaper veths).

Mechanisms, chosen per kernel (`mechanisms`): delay with netem on both veths when the kernel has
sch_netem and no jitter is asked for (netem reorders jittered packets); otherwise the NFQUEUE
delayer (emulator.delayer) in the shaper's namespace, one queue per direction.

Pure data and command text; emulator.lab runs the commands in the shaper nodes.
"""
from __future__ import annotations

import math
import subprocess
from dataclasses import dataclass, fields
from pathlib import Path

from emulator.errors import LabError

SHAPER_PREFIX = "sh_"
WAN_PREFIX = "wan-"
FW_PORT = "shfw"  # the shaper's veth toward the firewall node
NET_PORT = "shnet"  # the shaper's veth toward the bridge (zone or transit)
SHAPER_BRIDGE = "shbr"
PORTS = (FW_PORT, NET_PORT)
MAX_DELAY_MS = 10_000.0
MAX_BW = 100_000.0  # Mbit/s
MIN_BW = 0.01
HTB_QUANTUM_MAX = 200_000  # bytes; above, the kernel warns that the quantum is big


@dataclass(frozen=True)
class Impairment:
    """A link's shape. None (or 0) means not impaired in that respect; see the module docstring."""

    bw: float | None = None  # Mbit/s per direction
    delay_ms: float | None = None  # added round-trip time
    loss: float | None = None  # percent per direction
    jitter_ms: float | None = None  # spread of the round-trip time: ± jitter_ms

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise LabError(f"impairment {f.name}: expected a non-negative number, got {value!r}")
            object.__setattr__(self, f.name, float(value))
        if (self.loss or 0) > 100:
            raise LabError(f"impairment loss: {self.loss:g} is not a percentage (0-100)")
        if (self.delay_ms or 0) > MAX_DELAY_MS:
            raise LabError(f"impairment delay_ms: {self.delay_ms:g} ms is more than {MAX_DELAY_MS:g} ms")
        if (self.jitter_ms or 0) > (self.delay_ms or 0):
            raise LabError(f"impairment jitter_ms: {self.jitter_ms:g} ms exceeds delay_ms ({self.delay_ms or 0:g} ms); "
                           "a packet's hold is delay/2 ± jitter/2 per direction, so give jitter_ms <= delay_ms")
        if self.bw is not None and not MIN_BW <= self.bw <= MAX_BW:
            raise LabError(f"impairment bw: {self.bw:g} Mbit/s is outside {MIN_BW:g}-{MAX_BW:g} Mbit/s")

    @property
    def shaped(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))

    @property
    def delayed(self) -> bool:
        return bool(self.delay_ms or self.jitter_ms)

    def describe(self) -> str:
        parts = []
        if self.delay_ms:
            parts.append(f"delay {self.delay_ms:g} ms RTT" + (f" ±{self.jitter_ms:g} ms" if self.jitter_ms else ""))
        if self.loss:
            parts.append(f"loss {self.loss:g}% per direction")
        if self.bw:
            parts.append(f"bw {self.bw:g} Mbit/s per direction")
        return ", ".join(parts) or "no impairment"


def wan_link(firewall: str) -> str:
    """The name of a firewall node's link to the transit segment."""
    return f"{WAN_PREFIX}{firewall}"


def shaper_name(link: str) -> str:
    return f"{SHAPER_PREFIX}{link}"


# -- mechanisms ------------------------------------------------------------------------------------
def kernel_has_netem() -> bool:
    """sch_netem is loaded, built in, or loadable (`modprobe -n`: nothing is loaded to find out)."""
    if Path("/sys/module/sch_netem").exists():
        return True
    try:
        return subprocess.run(["modprobe", "-n", "-q", "sch_netem"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@dataclass(frozen=True)
class Mechanisms:
    """How a shaper realises an impairment: delay by 'netem', 'delayer' or '' (none); why, in words."""

    delay: str
    why: str
    loss: bool
    bw: bool


def mechanisms(impairment: Impairment, netem: bool) -> Mechanisms:
    if not impairment.delayed:
        delay, why = "", ""
    elif netem and not impairment.jitter_ms:
        delay, why = "netem", "kernel has sch_netem"
    elif netem:
        delay, why = "delayer", "netem would reorder jittered packets"
    else:
        delay, why = "delayer", "kernel has no sch_netem"
    return Mechanisms(delay, why, bool(impairment.loss), bool(impairment.bw))


def describe(impairment: Impairment, chosen: Mechanisms, shaper: str) -> str:
    """One line: what the link now does and by which mechanism."""
    if not impairment.shaped:
        return f"no impairment in shaper {shaper}"
    how = []
    if chosen.delay == "netem":
        how.append(f"netem on both veths ({chosen.why})")
    elif chosen.delay == "delayer":
        how.append(f"NFQUEUE delayer ({chosen.why})")
    if chosen.loss:
        how.append("iptables statistic loss")
    if chosen.bw:
        how.append("HTB on both veths")
    return f"{impairment.describe()}: {', '.join(how)} in shaper {shaper}"


# -- commands ----------------------------------------------------------------------------------------
SHAPER_SETUP = (f"link add name {SHAPER_BRIDGE} type bridge\n"
                f"link set {FW_PORT} master {SHAPER_BRIDGE}\n"
                f"link set {NET_PORT} master {SHAPER_BRIDGE}\n"
                f"link set {SHAPER_BRIDGE} up\n")  # for `ip -batch -` inside the shaper


def queues(first: int) -> dict[str, int]:
    """port a packet comes in on -> its NFQUEUE number (one queue per direction)."""
    return {FW_PORT: first, NET_PORT: first + 1}


def iptables_rules(impairment: Impairment, chosen: Mechanisms, first_queue: int) -> str:
    """The shaper's whole filter table (iptables-restore): loss first (a lost packet is never held), then the queue."""
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    for port, queue in queues(first_queue).items():
        if chosen.loss:
            lines.append(f"-A FORWARD -m physdev --physdev-in {port} -m statistic --mode random "
                         f"--probability {impairment.loss / 100:.6f} -j DROP")
        if chosen.delay == "delayer":
            lines.append(f"-A FORWARD -m physdev --physdev-in {port} -j NFQUEUE --queue-num {queue}")
    return "\n".join(lines + ["COMMIT", ""])


def tc_commands(port: str, impairment: Impairment, chosen: Mechanisms) -> list[list[str]]:
    """The qdiscs of one shaper veth (its egress is one direction), after its root qdisc was deleted."""
    commands = []
    parent = ["root"]
    if chosen.bw:
        rate_bytes = impairment.bw * 1e6 / 8
        quantum = int(min(HTB_QUANTUM_MAX, max(1514, rate_bytes / 10)))
        burst = int(max(15_000, rate_bytes / 1000))  # 1 ms of traffic, at least ten full frames
        commands += [["tc", "qdisc", "add", "dev", port, "root", "handle", "1:", "htb", "default", "1"],
                     ["tc", "class", "add", "dev", port, "parent", "1:", "classid", "1:1", "htb",
                      "rate", f"{impairment.bw:g}mbit", "ceil", f"{impairment.bw:g}mbit",
                      "burst", str(burst), "cburst", str(burst), "quantum", str(quantum)]]
        parent = ["parent", "1:1", "handle", "10:"]
    if chosen.delay == "netem":
        commands.append(["tc", "qdisc", "add", "dev", port, *parent, "netem",
                         "delay", f"{impairment.delay_ms / 2:g}ms", "limit", "100000"])
    return commands
