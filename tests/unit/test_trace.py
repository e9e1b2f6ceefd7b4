"""`nft monitor trace` text -> packets, fates and deciding steps; fixtures are real captures.

tests/data/trace/README.md says how the captures were made (nftables 1.0.6, iptables-nft 1.8.9).
"""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from emulator.trace import (MONITOR_COMMAND, TRACE_TABLE, TRACE_TABLE_NAME, Decision, DecisionKind, Fate,
                            PacketTrace, Verdict, parse_trace, read_trace)

DATA = Path(__file__).resolve().parents[1] / "data" / "trace"
CLIENT, SERVER, FIREWALL = "198.18.10.2", "198.18.11.2", "198.18.10.1"


def packets(name: str) -> list[PacketTrace]:
    return parse_trace((DATA / f"{name}.trace").read_text())


def first(traced: list[PacketTrace], **fields) -> PacketTrace:
    """The first packet whose fields all equal the given values."""
    found = [p for p in traced if all(getattr(p, k) == v for k, v in fields.items())]
    assert found, f"no packet with {fields}"
    return found[0]


@pytest.fixture(scope="module")
def iptables():
    return packets("iptables")


@pytest.fixture(scope="module")
def nft():
    return packets("nft")


def test_trace_table_is_ours_and_covers_both_hooks_before_raw_and_after_conntrack():
    assert TRACE_TABLE.startswith(f"table inet {TRACE_TABLE_NAME} {{")
    for hook in ("prerouting", "output"):
        assert f"type filter hook {hook} priority -310; policy accept;" in TRACE_TABLE
        assert f"type filter hook {hook} priority -190; policy accept;" in TRACE_TABLE
    assert TRACE_TABLE.count("ct state new meta nftrace set 1") == 2
    assert MONITOR_COMMAND == ("nft", "-a", "monitor", "trace")


def test_the_captures_parse_without_a_malformed_line():
    for name in ("iptables", "nft", "stateless"):
        log = read_trace((DATA / f"{name}.trace").read_text())
        assert log.malformed == 0 and log.first_malformed == ""
        assert len(log.packets) > 5


def test_packet_fields_come_from_the_users_chains(iptables):
    syn = first(iptables, dport=631)
    assert (syn.iif, syn.oif, syn.saddr, syn.daddr, syn.protocol) == ("attrfa", "attrfb", CLIENT, SERVER, "tcp")
    assert syn.tcp_flags == {"syn"} and syn.icmp_type is None and isinstance(syn.sport, int)
    reply = first(iptables, sport=631)
    assert reply.tcp_flags == {"syn", "ack"}  # printed as `tcp flags == 0x12`
    assert (reply.saddr, reply.daddr, reply.dport) == (SERVER, CLIENT, syn.sport)


def test_accept_by_a_rule_in_a_user_chain(iptables):
    packet = first(iptables, dport=631)
    assert packet.fate == Fate.ACCEPT
    assert packet.decision == Decision(DecisionKind.RULE, "ip", "filter", "PRINTERS", Verdict.ACCEPT, Fate.ACCEPT,
                                       13, "tcp dport 631 counter accept")
    jump = packet.hits[0]
    assert (jump.chain, jump.handle, jump.verdict, jump.target) == ("FORWARD", 10, Verdict.JUMP, "PRINTERS")


def test_jump_to_a_user_chain_that_drops(iptables, nft):
    for traced, chain, handle in ((iptables, "PRINTERS", 14), (nft, "printers", 12)):
        packet = first(traced, dport=82)
        assert packet.fate == Fate.DROP
        assert (packet.decision.kind, packet.decision.chain, packet.decision.handle) == (DecisionKind.RULE, chain, handle)
        assert [h.verdict for h in packet.hits] == [Verdict.JUMP, Verdict.DROP]


@pytest.mark.parametrize("dport, text", [
    (81, "tcp dport 81 counter reject"),  # -j REJECT --reject-with icmp-port-unreachable
    (162, "udp dport 162 counter reject"),
    (23, "tcp dport 23 counter reject with tcp reset"),
])
def test_iptables_reject_is_a_drop_verdict_with_reject_text(iptables, dport, text):
    packet = first(iptables, dport=dport, saddr=CLIENT)
    assert packet.fate == Fate.REJECT
    assert packet.decision.verdict == Verdict.DROP and packet.decision.text == text
    assert packet.hits[-1].is_reject


def test_nft_reject_variants(nft):
    assert first(nft, dport=81).decision.text == "tcp dport 81 reject"
    assert first(nft, dport=162).decision.text == "udp dport 162 reject with icmpx admin-prohibited"
    assert first(nft, dport=23).fate == Fate.REJECT


def test_comment_after_reject_still_reads_as_reject_and_drop_with_comment_as_drop(nft):
    assert first(nft, dport=83).fate == Fate.DROP  # `tcp dport 83 drop comment "raw-stage block"`
    log = read_trace('trace id 0000000a inet fw input packet: iif "x" ip saddr 1.2.3.4 ip daddr 5.6.7.8 tcp sport 1 tcp dport 2\n'
                     'trace id 0000000a inet fw input rule tcp dport 2 reject comment "no (really)" # handle 4 (verdict drop)\n')
    assert log.packets[0].fate == Fate.REJECT and log.packets[0].decision.handle == 4


def test_return_falls_through_to_the_base_chain_policy(iptables, nft):
    implicit = first(iptables, dport=9898)  # PRINTERS has no rule for it: implicit return
    explicit = first(nft, dport=9898)  # `tcp dport 9898 return`
    for packet, chain in ((implicit, "FORWARD"), (explicit, "forward")):
        assert packet.fate == Fate.DROP
        assert (packet.decision.kind, packet.decision.chain, packet.decision.text) == (DecisionKind.POLICY, chain, "policy drop")
    assert [h.verdict for h in explicit.hits] == [Verdict.JUMP, Verdict.RETURN]
    assert explicit.policies[-1].policy == Verdict.DROP


def test_policy_drop_on_input(iptables):
    packet = first(iptables, dport=24)
    assert packet.fate == Fate.DROP and packet.hits == ()
    assert (packet.decision.table, packet.decision.chain, packet.decision.verdict) == ("filter", "INPUT", Verdict.DROP)
    assert packet.oif is None and packet.daddr == FIREWALL


def test_a_packet_through_raw_and_filter(iptables):
    packet = first(iptables, dport=21, saddr=CLIENT)
    assert packet.base_chains == ("ip raw PREROUTING", "ip filter FORWARD")
    ct_helper = packet.hits[0]
    assert (ct_helper.table, ct_helper.verdict) == ("raw", Verdict.CONTINUE)
    assert ct_helper.text.endswith("xt target CT")  # -m comment prints as nothing: note the double space, collapsed
    assert [d.chain for d in packet.decisions] == ["PREROUTING", "PRINTERS"]
    assert packet.fate == Fate.ACCEPT and packet.decision.chain == "PRINTERS"  # the rule, not raw's policy


def test_a_raw_table_drop_is_seen_because_tracing_starts_before_raw(iptables, nft):
    for traced, table in ((iptables, "raw"), (nft, "early")):
        packet = first(traced, dport=83)
        assert packet.fate == Fate.DROP and len(packet.base_chains) == 1
        assert packet.decision.table == table and packet.oif is None


def test_udp_and_its_reply(iptables):
    request = first(iptables, dport=161)
    reply = first(iptables, sport=161)
    assert request.protocol == reply.protocol == "udp"
    assert request.fate == reply.fate == Fate.ACCEPT
    assert reply.decision.text == "ct state related,established counter accept"


def test_icmp_echo_and_reply(nft):
    request = first(nft, icmp_type="echo-request", saddr=CLIENT)
    reply = first(nft, icmp_type="echo-reply", daddr=CLIENT)
    assert request.protocol == "icmp" and request.sport is None and request.dport is None
    assert request.decision.text == "icmp type echo-request accept" and request.decision.handle == 10
    assert reply.fate == Fate.ACCEPT


def test_a_reject_answer_is_its_own_packet_traced_in_the_middle_of_the_rejected_one(iptables):
    unreachable = [p for p in iptables if p.icmp_type == "destination-unreachable"]
    assert unreachable and all(p.saddr == FIREWALL and p.iif is None for p in unreachable)
    assert all(p.base_chains == ("ip raw OUTPUT", "ip filter OUTPUT") for p in unreachable)


def test_a_packet_no_user_chain_saw_is_accepted_without_decision(nft):
    own_ping = first(nft, icmp_type="echo-request", saddr="198.18.11.1")  # the user's ruleset has no output chain
    assert own_ping.fate == Fate.ACCEPT and own_ping.decision is None and own_ping.base_chains == ()


def test_a_stateless_ruleset_dropping_replies_is_visible_and_handles_need_dash_a():
    traced = packets("stateless")
    syn = first(traced, dport=80)
    assert syn.fate == Fate.ACCEPT and syn.decision.handle is None  # captured without `-a`
    dropped = [p for p in traced if p.saddr == SERVER]
    assert {p.protocol for p in dropped} == {"tcp", "udp", "icmp"}
    assert all(p.fate == Fate.DROP and p.decision.kind == DecisionKind.POLICY for p in dropped)


HEAD = "trace id 1234abcd ip filter FORWARD"
PACKET = f'{HEAD} packet: iif "a" oif "b" ip saddr 198.18.0.1 ip daddr 198.18.0.2 tcp sport 5 tcp dport 6 tcp flags == syn'


def test_garbage_is_counted_never_raised():
    text = "\n".join([
        "Warning: something", PACKET,
        f"{HEAD} rule tcp dport 6 accept # handle 3 (verdict explode)",  # unknown verdict
        f"{HEAD} policy maybe", "trace id XYZ ip filter FORWARD policy drop", "trace id 1234abcd", "",
        f"{HEAD} rule tcp dport 6 accept # handle 3 (verdict accept)",
    ])
    log = read_trace(text)
    assert log.malformed == 5 and log.first_malformed == "Warning: something"
    assert [p.fate for p in log.packets] == [Fate.ACCEPT]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=80), st.sampled_from([
    PACKET, f"{HEAD} rule x # handle 1 (verdict drop)", f"{HEAD} policy accept", f"{HEAD} verdict continue",
    f"{HEAD} rule x (verdict jump Y)", "trace id 1234abcd inet safeq_lab_trace pre packet: ip saddr 1.1.1.1"])), max_size=12))
def test_never_raises_on_any_mix_of_lines(lines):
    log = read_trace("\n".join(lines))
    assert log.malformed >= 0 and all(isinstance(p.fate, Fate) for p in log.packets)


def test_lines_nft_prints_in_other_versions_and_cases():
    text = "\n".join([
        f"{HEAD} conntrack: ct direction original ct state new ct id 1234",  # nft >= 1.0.7
        PACKET,
        f"{HEAD} rule ip daddr 198.18.0.2 jump P # handle 2 (verdict jump P)",
        "trace id 1234abcd ip filter P verdict continue",  # implicit return on older kernels
        f"{HEAD} unknown rule handle 9 (verdict accept)",  # rule added after the monitor started
    ])
    log = read_trace(text)
    assert log.malformed == 0
    (packet,) = log.packets
    assert packet.fate == Fate.ACCEPT and packet.decision.handle == 9
    assert packet.decision.text == "unknown rule handle 9"
    assert read_trace(PACKET + f"\n{HEAD} policy drop meta mark == 0x00000001").packets[0].fate == Fate.DROP


def test_xt_target_reject_without_translation_is_a_reject():
    packet = parse_trace(PACKET + f"\n{HEAD} rule tcp dport 6 counter packets 3 bytes 180 xt target REJECT # handle 4 (verdict drop)")[0]
    assert packet.fate == Fate.REJECT and packet.decision.text == "tcp dport 6 counter xt target REJECT"


def test_a_trace_cut_before_any_verdict_is_unknown():
    packet = parse_trace(PACKET + f"\n{HEAD} rule ip daddr 198.18.0.2 jump P # handle 2 (verdict jump P)")[0]
    assert packet.fate == Fate.UNKNOWN and packet.decision is None


def test_accepted_by_every_base_chain_names_the_last_rule_not_a_later_policy():
    post = "trace id 1234abcd ip nat POSTROUTING"
    packet = parse_trace("\n".join([PACKET, f"{HEAD} rule tcp dport 6 accept # handle 3 (verdict accept)",
                                    f'{post} packet: oif "b" ip saddr 198.18.0.1 ip daddr 198.18.0.2 tcp sport 5 tcp dport 6',
                                    f"{post} policy accept"]))[0]
    assert packet.base_chains == ("ip filter FORWARD", "ip nat POSTROUTING")
    assert packet.fate == Fate.ACCEPT and packet.decision.handle == 3


def test_a_reused_trace_id_starts_a_new_packet_and_interleaved_ids_stay_apart():
    other = PACKET.replace("1234abcd", "0000ffff").replace("tcp dport 6", "tcp dport 7")
    text = "\n".join([PACKET, other, f"{HEAD} policy drop",
                      "trace id 0000ffff ip filter FORWARD rule tcp dport 7 accept # handle 5 (verdict accept)",
                      PACKET, f"{HEAD} rule tcp dport 6 accept # handle 3 (verdict accept)"])
    assert [(p.trace_id, p.dport, p.fate) for p in parse_trace(text)] == [
        ("1234abcd", 6, Fate.DROP), ("0000ffff", 7, Fate.ACCEPT), ("1234abcd", 6, Fate.ACCEPT)]


def test_our_own_table_is_skipped_but_fills_missing_fields():
    own = "trace id 1234abcd inet safeq_lab_trace out"
    packet = parse_trace("\n".join([f'{own} packet: oif "b" ip saddr 198.18.0.1 ip daddr 198.18.0.2 ip protocol tcp tcp sport 5 tcp dport 6',
                                    f"{own} rule ct state new meta nftrace set 1 # handle 7 (verdict continue)",
                                    f"{own} policy accept"]))[0]
    assert packet.hits == () and packet.policies == () and packet.decision is None
    assert (packet.oif, packet.protocol, packet.dport, packet.fate) == ("b", "tcp", 6, Fate.ACCEPT)
