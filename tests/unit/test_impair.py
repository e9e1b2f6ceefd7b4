"""Impairments without root: validation, the mechanism chosen per kernel, the commands a shaper
runs, topology links, and the delayer's timing (hold, order, release) as pure functions."""
from __future__ import annotations

import random
import textwrap

import pytest

from emulator import delayer, impair
from emulator.delayer import Direction, hold_seconds, kernel_drops, next_timeout, release_at
from emulator.errors import LabError
from emulator.impair import Impairment, mechanisms
from emulator.lab import Lab
from emulator.topology import LinkShape, load_topology


# -- Impairment ------------------------------------------------------------------------------------
def test_an_impairment_is_the_topology_link_shape():
    assert LinkShape is Impairment
    shape = Impairment(delay_ms=75, jitter_ms=10, loss=1, bw=8)
    assert shape.shaped and shape.delayed and shape.delay_ms == 75.0 and isinstance(shape.bw, float)
    assert not Impairment().shaped and not Impairment(delay_ms=0, loss=0).shaped
    assert Impairment(loss=5).shaped and not Impairment(loss=5).delayed


@pytest.mark.parametrize("kwargs, message", [
    ({"delay_ms": -1}, "delay_ms: expected a non-negative number"),
    ({"loss": 101}, "loss: 101 is not a percentage"),
    ({"bw": True}, "bw: expected a non-negative number"),
    ({"delay_ms": float("nan")}, "delay_ms: expected a non-negative number"),
    ({"delay_ms": 10, "jitter_ms": 20}, "jitter_ms: 20 ms exceeds delay_ms"),
    ({"jitter_ms": 5}, "jitter_ms: 5 ms exceeds delay_ms (0 ms)"),
    ({"bw": 0.001}, "bw: 0.001 Mbit/s is outside"),
    ({"delay_ms": 20_000}, "delay_ms: 20000 ms is more than"),
    ({"delay_ms": "10"}, "delay_ms: expected a non-negative number, got '10'"),
])
def test_bad_impairments_are_refused_in_one_line(kwargs, message):
    with pytest.raises(LabError) as caught:
        Impairment(**kwargs)
    assert message in str(caught.value) and "\n" not in str(caught.value)


# -- mechanisms ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, netem, delay", [
    (Impairment(delay_ms=50), True, "netem"),
    (Impairment(delay_ms=50), False, "delayer"),
    (Impairment(delay_ms=50, jitter_ms=10), True, "delayer"),  # netem reorders jittered packets
    (Impairment(loss=3, bw=5), False, ""),
    (Impairment(), True, ""),
])
def test_the_delay_mechanism_follows_the_kernel(shape, netem, delay):
    chosen = mechanisms(shape, netem)
    assert chosen.delay == delay and chosen.loss == bool(shape.loss) and chosen.bw == bool(shape.bw)


def test_the_description_names_the_mechanism_and_the_reason():
    shape = Impairment(delay_ms=75, loss=1, bw=8)
    line = impair.describe(shape, mechanisms(shape, False), "sh_wan-bfw")
    assert line == ("delay 75 ms RTT, loss 1% per direction, bw 8 Mbit/s per direction: NFQUEUE delayer "
                    "(kernel has no sch_netem), iptables statistic loss, HTB on both veths in shaper sh_wan-bfw")
    assert "netem on both veths (kernel has sch_netem)" in impair.describe(shape, mechanisms(shape, True), "s")
    assert impair.describe(Impairment(), mechanisms(Impairment(), False), "sh_hq") == "no impairment in shaper sh_hq"


def test_netem_is_asked_for_without_loading_it(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(impair, "Path", lambda _p: tmp_path / "absent")
    monkeypatch.setattr(impair.subprocess, "run", lambda argv, **_kw: calls.append(argv) or
                        type("Done", (), {"returncode": 1})())
    assert impair.kernel_has_netem() is False
    assert calls == [["modprobe", "-n", "-q", "sch_netem"]]


def test_shaper_rules_drop_then_queue_per_direction():
    shape = Impairment(delay_ms=40, loss=20)
    text = impair.iptables_rules(shape, mechanisms(shape, False), 6)
    forward = [l for l in text.splitlines() if l.startswith("-A FORWARD")]
    assert forward == [
        "-A FORWARD -m physdev --physdev-in shfw -m statistic --mode random --probability 0.200000 -j DROP",
        "-A FORWARD -m physdev --physdev-in shfw -j NFQUEUE --queue-num 6",
        "-A FORWARD -m physdev --physdev-in shnet -m statistic --mode random --probability 0.200000 -j DROP",
        "-A FORWARD -m physdev --physdev-in shnet -j NFQUEUE --queue-num 7"]
    assert text.startswith("*filter\n") and text.endswith("COMMIT\n")
    cleared = impair.iptables_rules(Impairment(), mechanisms(Impairment(), False), 6)
    assert "-A FORWARD" not in cleared  # clearing empties the shaper's table
    assert "NFQUEUE" not in impair.iptables_rules(shape, mechanisms(shape, True), 6)  # netem holds instead


def test_bandwidth_is_htb_on_each_veth_with_netem_below_it():
    shape = Impairment(bw=8, delay_ms=30)
    commands = impair.tc_commands("shfw", shape, mechanisms(shape, True))
    assert commands[0] == ["tc", "qdisc", "add", "dev", "shfw", "root", "handle", "1:", "htb", "default", "1"]
    assert commands[1][:12] == ["tc", "class", "add", "dev", "shfw", "parent", "1:", "classid", "1:1", "htb",
                                "rate", "8mbit"]
    assert commands[2][:9] == ["tc", "qdisc", "add", "dev", "shfw", "parent", "1:1", "handle", "10:"]
    assert "15ms" in commands[2]  # each direction holds half the round trip
    assert impair.tc_commands("shnet", Impairment(delay_ms=30), mechanisms(Impairment(delay_ms=30), False)) == []
    quantum = commands[1][commands[1].index("quantum") + 1]
    big = impair.tc_commands("shfw", Impairment(bw=10_000), mechanisms(Impairment(bw=10_000), False))[1]
    assert 1514 <= int(quantum) and int(big[big.index("quantum") + 1]) == impair.HTB_QUANTUM_MAX


# -- topology links ----------------------------------------------------------------------------------
def write(tmp_path, text: str):
    path = tmp_path / "t.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


TWO_SITES = """\
    name: t
    firewalls:
      - {name: fw, zones: [hq]}
      - {name: bfw, zones: [br], wan: %s}
    transit: 198.18.254.0/24
    zones:
      - {name: hq, subnet: 198.18.1.0/24, link: {loss: 2}, hosts: [{name: h1, roles: [user]}]}
      - name: br
        subnet: 198.18.2.0/24
        hosts: [{name: b1, roles: [user]%s}]
    """


def test_links_are_zones_and_wan_links_with_their_shapes(tmp_path):
    topo = load_topology(write(tmp_path, TWO_SITES % ("{delay_ms: 60, jitter_ms: 10}", "")))
    assert topo.link_names == ("hq", "br", "wan-fw", "wan-bfw")
    assert topo.shaped_links == ("hq", "wan-bfw")
    assert topo.link_shape("wan-bfw") == Impairment(delay_ms=60, jitter_ms=10)
    assert topo.firewall_node("bfw").wan_link == "wan-bfw" and not topo.link_shape("wan-fw").shaped
    with pytest.raises(LabError, match="no link 'wan-x'; links: hq, br, wan-fw, wan-bfw"):
        topo.link_shape("wan-x")
    assert load_topology("branch-office").shaped_links == ()  # the default audit builds no shaper
    assert "wan-bfw" in load_topology("branch-office").link_names


@pytest.mark.parametrize("wan, host_link, message", [
    ("{delay_ms: 10, jitter_ms: 20}", "", "firewalls[1].wan: impairment jitter_ms: 20 ms exceeds delay_ms"),
    ("{delay: 10}", "", "firewalls[1].wan: unknown key(s) delay"),
    ("{}", ", link: {delay_ms: 5}", "hosts[0].link.delay_ms: a host's link takes only bw; delay, jitter and loss "
                                    "go on its zone's link (zones[br].link)"),
    ("{}", ", link: {loss: 5}", "hosts[0].link.loss: a host's link takes only bw"),
])
def test_bad_links_are_refused_with_the_field(tmp_path, wan, host_link, message):
    with pytest.raises(LabError) as caught:
        load_topology(write(tmp_path, TWO_SITES % (wan, host_link)))
    assert message in str(caught.value)


def test_a_single_firewall_has_no_wan(tmp_path):
    path = write(tmp_path, """\
        name: t
        firewalls: [{name: fw, zones: [a], wan: {delay_ms: 5}}]
        zones: [{name: a, subnet: 198.18.1.0/24, hosts: [{name: h1, roles: [user]}]}]
        """)
    with pytest.raises(LabError, match="firewalls\\[0\\].wan: only firewall nodes joined by a transit segment"):
        load_topology(path)


def test_a_lab_refuses_unknown_impairable_links_before_building(tmp_path):
    topo = load_topology(write(tmp_path, TWO_SITES % ("{}", "")))
    with pytest.raises(LabError, match="cannot make wan-x impairable: not a link of topology t \\(links: hq, br, "
                                       "wan-fw, wan-bfw"):
        Lab(topo, impairable=["wan-x"])
    assert Lab(topo, impairable=["br"]).links == ("hq", "br")  # topology order; hq is shaped by the topology
    assert Lab(load_topology("single-site")).links == ()


# -- the delayer's timing ----------------------------------------------------------------------------
def test_each_direction_holds_half_the_round_trip_spread_by_half_the_jitter():
    assert hold_seconds(100, 0, 0.3) == pytest.approx(0.050)
    assert hold_seconds(100, 40, 0.0) == pytest.approx(0.030)
    assert hold_seconds(100, 40, 0.999999) == pytest.approx(0.070, abs=1e-6)
    assert hold_seconds(10, 40, 0.0) == 0.0  # never negative
    assert release_at(1.0, 0.05, 0.0) == pytest.approx(1.05)
    assert release_at(1.0, 0.01, 1.2) == 1.2  # never before the packet ahead


def test_packets_leave_in_order_when_due_whatever_their_jitter():
    direction = Direction(delay_ms=100, jitter_ms=80)
    rng = random.Random(7)
    releases = [direction.admit(n, n * 0.001, rng.random()) for n in range(500)]
    assert releases == sorted(releases)
    assert all(0.010 <= r - n * 0.001 <= 0.090 + 1e-9 or r == releases[n - 1] for n, r in enumerate(releases))
    assert direction.due(0.0) == [] and direction.next_due() == releases[0]
    out = []
    for now in [i * 0.0005 for i in range(2000)]:
        out += direction.due(now)
    assert out == list(range(500)) and direction.released == 500 and not direction.held
    assert direction.most_held > 1


def test_a_new_delay_applies_to_new_packets_without_reordering():
    direction = Direction(delay_ms=200)
    first = direction.admit("a", 0.0, 0.5)
    direction.delay_ms = 20
    second = direction.admit("b", 0.001, 0.5)
    assert first == pytest.approx(0.1) and second == first  # would have been 0.011: waits for "a"
    assert direction.due(0.1) == ["a", "b"]


def test_the_next_wakeup_is_the_earliest_due_packet():
    a, b = Direction(delay_ms=20), Direction(delay_ms=60)
    assert next_timeout([a, b], 0.0) is None
    a.admit(1, 0.0, 0.5)
    b.admit(2, 0.0, 0.5)
    assert next_timeout([a, b], 0.004) == pytest.approx(0.006)
    assert next_timeout([a, b], 0.5) == 0.0


def test_kernel_drops_are_read_per_queue():
    text = ("    6  12345     0 1 65531     3     2      900  1\n"
            "    7  12346     4 1 65531     0     0      950  1\n"
            "    9  12347     0 1 65531    99     0       10  1\n")
    assert kernel_drops(text, [6, 7]) == {6: 5, 7: 0}


def test_the_delayer_answers_stats_and_new_delays(capsys):
    directions = {4: Direction(), 5: Direction()}
    delayer._command('{"delay_ms": 80, "jitter_ms": 8}', directions)
    assert capsys.readouterr().out == "OK\n" and directions[5].delay_ms == 80 and directions[4].jitter_ms == 8
    delayer._command("{not json", directions)
    assert capsys.readouterr().out.startswith("ERROR ")
    delayer._command("stats", directions)
    assert '"4": {"admitted": 0' in capsys.readouterr().out
