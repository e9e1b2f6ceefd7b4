"""Link impairments in a real lab: two sites joined by a WAN, shaped by shaper nodes (emulator.impair).

Delay, jitter, loss and bandwidth are measured end to end (ping, a bulk TCP transfer) across the
branch firewall's WAN link and a zone link, set from the topology and changed while the lab runs;
a user's `flush ruleset` on the firewall leaves them in place; teardown leaves nothing behind.
"""
from __future__ import annotations

import math
import re
import signal
import statistics
import subprocess
import sys
import time

import pytest

from emulator import impair
from emulator.errors import LabError
from emulator.impair import Impairment
from emulator.lab import Lab
from emulator.rules import Ruleset
from emulator.topology import load_topology
from emulator import state
from tests.lab.helpers import footprint, run_cli

pytestmark = pytest.mark.lab
CLEAN = {"bridges": [], "processes": [], "state": [], "mininet_shells": []}
WAN_DELAY = 75.0
TRANSFER_PORT = 47_001  # not a catalog port: a bulk sender/receiver of this test only
TRANSFER_BYTES = 4_000_000
OUTLIERS = 0.05  # share of samples a busy machine may delay past a bound (each within the delayer's own lateness)
RTT = re.compile(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms")
COUNTS = re.compile(r"(\d+) packets transmitted, (\d+) received")
TWO_SITES = """name: impair-two-sites
firewalls:
  - {name: fw, zones: [hq]}
  - {name: bfw, zones: [br], wan: {delay_ms: %g}}
transit: 198.18.254.0/24
zones:
  - name: hq
    subnet: 198.18.110.0/24
    hosts: [{name: h1, roles: [user]}]
  - name: br
    subnet: 198.18.111.0/24
    hosts: [{name: b1, roles: [user]}]
""" % WAN_DELAY
RECEIVER = """
import socket, sys, time
server = socket.create_server(("", int(sys.argv[1])))
print("LISTENING", flush=True)
conn, _ = server.accept()
total, first = 0, None
while chunk := conn.recv(1 << 16):
    first = first or time.monotonic()
    total += len(chunk)
print(total, time.monotonic() - first, flush=True)
"""
SENDER = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2]))) as s:
    s.sendall(bytes(int(sys.argv[3])))
"""


KILLED_LAB = """
import sys, time
from emulator.lab import Lab
from emulator.topology import load_topology
with Lab(load_topology(sys.argv[1])) as lab:
    print("UP", flush=True)
    time.sleep(600)
"""


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("impair") / "two-sites.yaml"
    path.write_text(TWO_SITES)
    return str(path)


def test_clean_removes_a_killed_labs_shapers_and_delayer(lab_host, two_sites):
    """First in the module: no other lab of this process runs while it checks the footprint."""
    proc = subprocess.Popen([sys.executable, "-c", KILLED_LAB, two_sites], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "UP"
        recorded = [entry for _path, owner in state.runs() if owner.get("pid") == proc.pid
                    for entry in owner.get("processes", [])]
        commands = [" ".join(state._cmdline(pid)) for pid, _start in recorded]
        assert any("emulator.delayer" in c for c in commands), commands
        assert any("mininet:sh_wan-bfw" in c for c in commands), commands
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    cleaned = run_cli("clean", timeout=120)
    assert cleaned.returncode == 0, cleaned.stderr
    assert footprint() == CLEAN


@pytest.fixture(scope="module")
def lab(lab_host, two_sites):
    with Lab(load_topology(two_sites), impairable=["hq"]) as running:
        yield running
    assert footprint() == CLEAN


def run_in(lab, host: str, argv: list[str], timeout: float = 30) -> str:
    proc = lab.node(host).popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=timeout)
    return out


def ping(lab, count: int, interval: float = 0.02, quiet: bool = True) -> str:
    b1 = lab.topology.host("b1").address
    return run_in(lab, "h1", ["ping", "-n", "-i", str(interval), "-c", str(count), "-W", "2"]
                  + (["-q"] if quiet else []) + [b1])


def rtt(lab, count: int = 20) -> tuple[float, float, float]:
    """min, avg, max round-trip time (ms)."""
    out = ping(lab, count)
    found = RTT.search(out)
    assert found, out
    return float(found[1]), float(found[2]), float(found[3])


def round_trips(lab, count: int) -> list[float]:
    """Each echo's round-trip time (ms), in order."""
    out = ping(lab, count, quiet=False)
    times = [float(t) for t in re.findall(r"time=([\d.]+) ms", out)]
    assert len(times) == count, out[-500:]
    return times


def late_allowance(stats: dict) -> float:
    """How late (ms) the delayer says it released a packet at worst, both directions of a round trip together.

    On a busy machine a packet may leave a scheduler slice late; the delayer counts it. A sample beyond
    the configured bound by no more than that is the machine's, not the delay's; one beyond it fails.
    """
    return sum(q["late_ms_most"] for q in stats.values())


def within_spread(times: list[float], spread: float, allowance: float) -> bool:
    """All but OUTLIERS of the samples lie within `spread` ms of the fastest, and the rest within the allowance too."""
    fastest = min(times)
    outside = [t for t in times if t - fastest >= spread]
    return len(outside) <= OUTLIERS * len(times) and max(times) - fastest < spread + allowance


def near(measured: float, expected: float) -> bool:
    return abs(measured - expected) <= 0.1 * expected + 1.0


def test_links_and_mechanisms_are_reported(lab):
    assert lab.links == ("hq", "wan-bfw")
    described = lab.impair("wan-bfw", Impairment(delay_ms=WAN_DELAY))
    assert "shaper sh_wan-bfw" in described and f"delay {WAN_DELAY:g} ms RTT" in described
    if not impair.kernel_has_netem():
        assert "NFQUEUE delayer (kernel has no sch_netem)" in described
    with pytest.raises(LabError, match="not made impairable.*impairable=\\['br'\\]"):
        lab.impair("br", Impairment(loss=1))
    with pytest.raises(LabError, match="has no link 'nosuch'.*wan-bfw"):
        lab.impair("nosuch", Impairment(loss=1))


def test_delay_adds_the_round_trip_time_and_clears(lab, record_summary):
    lab.impair("wan-bfw", Impairment(delay_ms=WAN_DELAY))
    delayed = rtt(lab)
    lab.clear_impairment("wan-bfw")
    base = rtt(lab)
    assert base[1] < 5, base
    assert near(delayed[1], base[1] + WAN_DELAY), (delayed, base)
    lab.impair("wan-bfw", Impairment(delay_ms=100))
    times = round_trips(lab, 20)
    stats = lab.delayer_stats("wan-bfw")
    assert stats and all(q["dropped"] == 0 for q in stats.values()), stats
    allowance = late_allowance(stats)
    assert near(statistics.mean(times), base[1] + 100), (times, base)
    assert within_spread(times, 3, allowance), (times, allowance)
    late = ", ".join(f"queue {q} late {s['late_ms_mean']:.3f} ms mean, {s['late_ms_most']:.3f} max"
                     for q, s in stats.items())
    record_summary(f"impair: base RTT {base[1]:.3f} ms; +{WAN_DELAY:g} ms -> {delayed[1]:.3f} ms; "
                   f"+100 ms -> {statistics.mean(times):.3f} ms (min {min(times):.3f}, max {max(times):.3f}); {late}")


def test_jitter_spreads_without_reordering(lab, record_summary):
    lab.clear_impairment("wan-bfw")
    base = rtt(lab)
    lab.impair("wan-bfw", Impairment(delay_ms=100, jitter_ms=40))
    out = ping(lab, 100, interval=0.01, quiet=False)
    seqs = [int(s) for s in re.findall(r"icmp_seq=(\d+)", out)]
    times = [float(t) for t in re.findall(r"time=([\d.]+) ms", out)]
    assert len(seqs) == 100 and seqs == sorted(seqs), out[-500:]
    low, high = base[0] + 60 - 1, base[2] + 140 + 2
    outside = [t for t in times if not low <= t <= high]
    allowance = late_allowance(lab.delayer_stats("wan-bfw"))
    assert len(outside) <= OUTLIERS * len(times), (outside, low, high)
    assert min(times) >= low and max(times) <= high + allowance, (min(times), max(times), base, allowance)
    assert max(times) - min(times) > 20, (min(times), max(times))
    record_summary(f"impair: 100 ms ±40 ms -> RTT {min(times):.3f}..{max(times):.3f} ms, in order")
    lab.clear_impairment("wan-bfw")


def test_loss_drops_its_share_in_each_direction(lab, record_summary):
    lab.clear_impairment("wan-bfw")
    described = lab.impair("hq", Impairment(loss=20))
    assert "iptables statistic loss" in described and "shaper sh_hq" in described
    out = ping(lab, 500, interval=0.01)
    sent, received = map(int, COUNTS.search(out).groups())
    lost = 1 - received / sent
    expected = 1 - 0.8 * 0.8  # a round trip survives both directions
    band = 4 * math.sqrt(expected * (1 - expected) / sent)
    record_summary(f"impair: loss 20% per direction -> {lost:.1%} of {sent} pings lost (expected {expected:.0%} ± {band:.1%})")
    assert abs(lost - expected) <= band, (lost, expected, band)
    lab.clear_impairment("hq")
    assert COUNTS.search(ping(lab, 50, interval=0.01))[2] == "50"


def test_bandwidth_limits_a_bulk_transfer(lab, record_summary):
    lab.impair("wan-bfw", Impairment(bw=8))
    receiver = lab.node("b1").popen([lab.python, "-c", RECEIVER, str(TRANSFER_PORT)], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
    try:
        assert receiver.stdout.readline().strip() == "LISTENING"
        started = time.monotonic()
        run_in(lab, "h1", [lab.python, "-c", SENDER, lab.topology.host("b1").address, str(TRANSFER_PORT),
                           str(TRANSFER_BYTES)], timeout=60)
        out, _ = receiver.communicate(timeout=60)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.communicate()
    total, elapsed = out.split()
    assert int(total) == TRANSFER_BYTES
    expected = TRANSFER_BYTES * 8 / 8e6
    record_summary(f"impair: bw 8 Mbit/s -> {TRANSFER_BYTES} bytes in {float(elapsed):.3f} s (expected {expected:.3f} s)")
    assert abs(float(elapsed) - expected) <= 0.2 * expected, (elapsed, expected, time.monotonic() - started)
    lab.clear_impairment("wan-bfw")


def test_a_flushed_firewall_keeps_the_impairment(lab):
    lab.impair("wan-bfw", Impairment(delay_ms=WAN_DELAY))
    lab.apply_rules({"bfw": Ruleset("nft", "flush ruleset\n", "the user's flush")})
    lab.apply_rules({"fw": Ruleset("nft", "flush ruleset\n", "the user's flush")})
    delayed = rtt(lab)
    lab.clear_impairment("wan-bfw")
    base = rtt(lab)
    assert near(delayed[1], base[1] + WAN_DELAY), (delayed, base)
