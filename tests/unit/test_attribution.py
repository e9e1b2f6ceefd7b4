"""From a traced decision back to the line of the user's rules file, and the rule that would admit the flow."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from emulator import rules
from emulator.attribution import (RuleMap, RuleRef, SourceIndex, allow_rule, attribute, ftp_helper_rule, index_source,
                                  reply_rule)
from emulator.catalog import load_catalog
from emulator.errors import LabError
from emulator.plan import audit_plan
from emulator.rules import Ruleset
from emulator.topology import load_topology
from emulator.trace import TRACE_TABLE, TRACE_TABLE_NAME, Decision, DecisionKind, Fate, Verdict, parse_trace

DATA = Path(__file__).resolve().parents[1] / "data" / "trace"


def ruleset(name: str) -> Ruleset:
    return Ruleset("iptables" if name.endswith(".v4") else "nft", (DATA / name).read_text(), name)


def index(name: str) -> SourceIndex:
    return index_source(ruleset(name))


def listing(name: str) -> str:
    return (DATA / f"{name}.listing.json").read_text()


def shape(idx: SourceIndex) -> dict:
    """chain -> (hook, policy, policy line, [rule lines], exact)."""
    return {c.name: (c.hook, c.policy, c.policy_line, [r.line for r in c.rules], c.exact) for c in idx.chains}


# --- source indexing ----------------------------------------------------------------------------

def test_iptables_file_is_indexed_per_table_section():
    idx = index("rules.v4")
    assert [c.key for c in idx.chains] == [("ip", "raw", "PREROUTING"), ("ip", "raw", "OUTPUT"), ("ip", "filter", "INPUT"),
                                           ("ip", "filter", "FORWARD"), ("ip", "filter", "OUTPUT"), ("ip", "filter", "PRINTERS")]
    forward = idx.chain("ip", "filter", "FORWARD")
    assert (forward.hook, forward.policy, forward.policy_line) == ("forward", "DROP", 10)
    assert [r.line for r in forward.rules] == [17, 18, 19, 20]
    assert forward.rules[1].text == "-A FORWARD -d 198.18.11.2/32 -j PRINTERS"
    printers = idx.chain("ip", "filter", "PRINTERS")
    assert (printers.hook, printers.policy, len(printers.rules)) == (None, None, 6)
    assert idx.chain("ip", "raw", "PREROUTING").rules[1].text == "-A PREROUTING -p tcp -m tcp --dport 83 -j DROP"
    assert idx.base_chain("forward") is forward and idx.base_chain("input").name == "INPUT"


def test_iptables_insert_is_followed_and_delete_makes_the_chain_inexact():
    text = "\n".join(["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD DROP [0:0]",
                      "-A FORWARD -p tcp --dport 1 -j ACCEPT", "-A FORWARD -p tcp --dport 2 -j ACCEPT",
                      "-I FORWARD -p tcp --dport 3 -j ACCEPT", "-I FORWARD 2 -p tcp --dport 4 -j ACCEPT",
                      "-N EXTRA", "-A EXTRA -j RETURN", "-P INPUT DROP", "-A INPUT -j EXTRA",
                      "-D INPUT -j EXTRA", "COMMIT", ""])
    chains = shape(index_source(Ruleset("iptables", text, "v4")))
    # the order `iptables-restore` gives (checked: nft lists dport 3, 4, 1, 2)
    assert chains["FORWARD"] == ("forward", "DROP", 3, [6, 7, 4, 5], True)
    assert chains["INPUT"] == ("input", "DROP", 10, [11], False)
    assert chains["EXTRA"] == (None, None, None, [9], True)


def test_nft_file_is_indexed_by_blocks_and_add_rule_commands():
    chains = shape(index("rules.nft"))
    assert chains == {
        "pre": ("prerouting", "accept", 7, [8], True),
        "input": ("input", "drop", 14, [15, 16, 17, 18], True),
        "forward": ("forward", "drop", 23, [24, 25, 26, 40], True),  # + `add rule inet fw forward ...`
        "printers": (None, None, None, [30, 31, 32, 33, 35, 36], True),  # a set over lines 33-34 is one rule
    }
    idx = index("rules.nft")
    assert idx.chain("inet", "fw", "printers").rules[3].text == "tcp dport { 21, 80 } accept"
    assert idx.chain("ip", "early", "pre").rules[0].text == 'tcp dport 83 drop comment "raw-stage block"'
    assert idx.base_chain("forward").key == ("inet", "fw", "forward")


NFT_EDGE_CASES = """\
flush ruleset
define admins = { 198.18.5.0/24 }
table filter {  # no family: ip
    set blocked { type ipv4_addr; flags interval; elements = { 198.18.9.0/24,
                                                                198.18.8.1 } }
    chain c { type filter hook input priority 0; policy drop; tcp dport 22 accept; udp dport 53 accept; }
    chain user {
        comment "not a rule"
        ip saddr @blocked counter drop comment "a } brace; and # hash in a comment"
        ip saddr $admins \\
            accept
    }
}
add chain ip filter late { type filter hook forward priority 0 ; policy accept ; }
insert rule ip filter user tcp dport 1 drop
add rule ip filter user index 0 tcp dport 2 drop
add rule filter c tcp dport 3 accept
"""


def test_nft_edge_cases_one_line_chains_sets_quotes_continuations_and_placed_rules():
    idx = index_source(Ruleset("nft", NFT_EDGE_CASES, "edge.nft"))
    assert shape(idx) == {
        "c": ("input", "drop", 6, [6, 6, 17], True),
        "user": (None, None, None, [15, 9, 10], False),  # `index 0`: placed by position, not followed
        "late": ("forward", "accept", 14, [], True),
    }
    user = idx.chain("ip", "filter", "user")
    assert user.rules[1].text == 'ip saddr @blocked counter drop comment "a } brace; and # hash in a comment"'
    assert user.rules[2].text == "ip saddr $admins accept"


def test_flush_ruleset_forgets_what_came_before():
    text = "table inet t {\n chain c {\n  accept\n }\n}\nflush ruleset\ntable inet u {\n chain d {\n  drop\n }\n}\n"
    assert [c.key for c in index_source(Ruleset("nft", text, "f.nft")).chains] == [("inet", "u", "d")]


# --- mapping the loaded ruleset back to lines ----------------------------------------------------

@pytest.mark.parametrize("name, source", [("iptables", "rules.v4"), ("nft", "rules.nft"), ("stateless", "stateless.nft")])
def test_every_loaded_rule_maps_to_its_line(name, source):
    rule_map = attribute(listing(name), index(source))
    lines = (DATA / source).read_text().splitlines()
    assert rule_map.unmatched == () and rule_map.rules
    for (family, table, chain, handle), ref in rule_map.rules.items():
        assert table != TRACE_TABLE_NAME
        assert ref.file == source and ref.line is not None
        assert " ".join(lines[ref.line - 1].split()).startswith(ref.text[:10])
    assert all(ref.line is not None for ref in rule_map.policies.values())


def test_positional_mapping_by_handle():
    rules = attribute(listing("iptables"), index("rules.v4")).rules
    assert rules[("ip", "filter", "PRINTERS", 14)] == RuleRef("rules.v4", 22, "-A PRINTERS -p tcp -m tcp --dport 82 -j DROP")
    assert rules[("ip", "raw", "PREROUTING", 3)].line == 5
    nft = attribute(listing("nft"), index("rules.nft")).rules
    assert nft[("inet", "fw", "forward", 18)] == RuleRef("rules.nft", 40, "add rule inet fw forward udp dport 161 accept")
    assert nft[("inet", "fw", "printers", 15)].line == 33


def test_policies_map_to_the_line_that_declared_them_and_read_as_no_rule_matched():
    policies = attribute(listing("iptables"), index("rules.v4")).policies
    assert policies[("ip", "filter", "FORWARD")].describe() == "rules.v4:10: no rule matched: chain FORWARD policy DROP"
    assert ("ip", "filter", "PRINTERS") not in policies  # user chains have no policy
    nft = attribute(listing("nft"), index("rules.nft")).policies
    assert nft[("inet", "fw", "input")].describe() == "rules.nft:14: no rule matched: chain input policy drop"


def test_count_mismatch_falls_back_to_the_listed_text_without_a_line():
    text = (DATA / "rules.nft").read_text().replace("\t\ttcp dport 82 drop\n", "")
    rule_map = attribute(listing("nft"), index_source(Ruleset("nft", text, "rules.nft")))
    assert rule_map.unmatched == (("inet", "fw", "printers"),)
    printers = {k[3]: v for k, v in rule_map.rules.items() if k[2] == "printers"}
    assert all(ref.line is None for ref in printers.values())
    assert printers[11].describe() == "rules.nft:?: tcp dport 631 accept"
    assert printers[15].text == "tcp dport { 21, 80 } accept"
    assert rule_map.rules[("inet", "fw", "forward", 8)].line == 24  # other chains keep their lines


def test_iptables_nft_rules_list_their_extensions_as_xt_in_json():
    rule_map = attribute(listing("iptables"), SourceIndex("rules.v4", "iptables", ()))
    assert len(rule_map.unmatched) == 6  # nothing in the (empty) index: every chain falls back
    assert rule_map.rules[("ip", "filter", "PRINTERS", 15)].text == "tcp dport 81 counter xt target REJECT"
    assert rule_map.rules[("ip", "filter", "FORWARD", 9)].text == "xt match conntrack counter accept"


def test_a_bad_listing_is_a_one_line_lab_error():
    with pytest.raises(LabError, match=r"not JSON \(line 1\)"):
        attribute("table inet x {", index("rules.nft"))
    with pytest.raises(LabError, match="no \"nftables\" list"):
        attribute('{"tables": []}', index("rules.nft"))
    assert attribute({"nftables": [{"metainfo": {}}, "junk"]}, index("rules.nft")).rules == {}


# --- from a traced packet to a line ---------------------------------------------------------------

@pytest.mark.parametrize("name, source, dport, expected", [
    ("iptables", "rules.v4", 82, "rules.v4:22: -A PRINTERS -p tcp -m tcp --dport 82 -j DROP"),
    ("iptables", "rules.v4", 9898, "rules.v4:10: no rule matched: chain FORWARD policy DROP"),
    ("iptables", "rules.v4", 83, "rules.v4:6: -A PREROUTING -p tcp -m tcp --dport 83 -j DROP"),
    ("iptables", "rules.v4", 631,
     'rules.v4:21: -A PRINTERS -p tcp -m tcp --dport 631 -m comment --comment "ipp-01 mfd" -j ACCEPT'),
    ("nft", "rules.nft", 81, "rules.nft:32: tcp dport 81 reject"),
    ("nft", "rules.nft", 24, "rules.nft:14: no rule matched: chain input policy drop"),
    ("nft", "rules.nft", 161, "rules.nft:40: add rule inet fw forward udp dport 161 accept"),
])
def test_a_traced_decision_names_the_users_line(name, source, dport, expected):
    packet = next(p for p in parse_trace((DATA / f"{name}.trace").read_text()) if p.dport == dport)
    assert attribute(listing(name), index(source)).explain(packet.decision).describe() == expected


def test_explain_without_handles_or_map_entries_uses_the_traced_text():
    empty = RuleMap("rules.nft", {}, {}, ())
    rule = Decision(DecisionKind.RULE, "inet", "fw", "forward", Verdict.DROP, Fate.DROP, None, "tcp dport 82 drop")
    policy = Decision(DecisionKind.POLICY, "inet", "fw", "forward", Verdict.DROP, Fate.DROP, text="policy drop")
    assert empty.explain(rule).describe() == "rules.nft:?: tcp dport 82 drop"
    assert empty.explain(policy).describe() == "rules.nft:?: no rule matched: chain forward policy drop"


# --- the rule that would admit a blocked flow ----------------------------------------------------

def test_allow_rule_iptables():
    assert allow_rule("iptables", "198.18.3.10", "198.18.1.10", "tcp", 9898, "forward") == (
        "-A FORWARD -s 198.18.3.10/32 -d 198.18.1.10/32 -p tcp -m tcp --dport 9898 -m conntrack --ctstate NEW -j ACCEPT")
    assert allow_rule("iptables", "198.18.3.10", "198.18.1.10", "icmp", None, index("rules.v4").base_chain("input"),
                      insert=True) == ("-I INPUT -s 198.18.3.10/32 -d 198.18.1.10/32 -p icmp -m icmp --icmp-type 8 "
                                       "-m conntrack --ctstate NEW -j ACCEPT")
    assert allow_rule("iptables", "198.18.3.0/24", "198.18.1.10", "udp", 161, "FORWARD").startswith(
        "-A FORWARD -s 198.18.3.0/24 -d 198.18.1.10/32 -p udp -m udp --dport 161 ")


def test_allow_rule_nft_uses_the_users_own_chain():
    forward = index("rules.nft").base_chain("forward")
    assert allow_rule("nft", "198.18.3.10", "198.18.1.10", "tcp", 9898, forward) == (
        "add rule inet fw forward ip saddr 198.18.3.10 ip daddr 198.18.1.10 tcp dport 9898 ct state new accept")
    assert allow_rule("nft", "198.18.3.10", "198.18.1.10", "icmp", None, index("stateless.nft").base_chain("forward"),
                      insert=True) == ("insert rule ip plain forward ip saddr 198.18.3.10 ip daddr 198.18.1.10 "
                                       "icmp type echo-request ct state new accept")
    assert index("stateless.nft").base_chain("input") is None
    assert allow_rule("nft", "198.18.3.10", "198.18.1.10", "udp", 161, "input").startswith("add rule inet filter input ")


@pytest.mark.parametrize("args, message", [
    (("nft", "198.18.3.10", "198.18.1.10", "sctp", 1), "use tcp, udp or icmp"),
    (("nft", "198.18.3.10", "198.18.1.10", "tcp", None), "needs a port"),
    (("pf", "198.18.3.10", "198.18.1.10", "tcp", 80), "unknown rules format"),
])
def test_allow_rule_refuses_what_it_cannot_write(args, message):
    with pytest.raises(LabError, match=message):
        allow_rule(*args)


# --- for real: load both rulesets in a throwaway namespace (root) ---------------------------------

@pytest.fixture(scope="module")
def netns_tools():
    """Root and the tools; otherwise this test fails loudly, like every lab test."""
    problems = [] if os.geteuid() == 0 else ["not root"]
    problems += [f"{tool} missing" for tool in ("unshare", "nft", "iptables-restore") if not shutil.which(tool)]
    if problems:
        pytest.fail("the attribution lab test loads rulesets in a network namespace: " + ", ".join(problems))


def load_and_list(tmp_path: Path, load: str, rules_file: Path) -> str:
    """`nft -j -a list ruleset` after loading the rules and then our trace table, in a fresh netns."""
    trace_table = tmp_path / "trace.nft"
    trace_table.write_text(TRACE_TABLE)
    proc = subprocess.run(["unshare", "--net", "sh", "-c", f'{load} "$1" && nft -f "$2" && nft -j -a list ruleset',
                           "sh", str(rules_file), str(trace_table)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert TRACE_TABLE_NAME in proc.stdout  # the trace table loads after the user's rules
    return proc.stdout


@pytest.mark.lab
@pytest.mark.parametrize("source, load", [("rules.v4", "iptables-restore"), ("rules.nft", "nft -f")])
def test_loaded_rulesets_map_every_rule_to_its_source_line(netns_tools, tmp_path, source, load):
    idx = index(source)
    rule_map = attribute(load_and_list(tmp_path, load, DATA / source), idx)
    assert rule_map.unmatched == ()
    assert sorted(ref.line for ref in rule_map.rules.values()) == sorted(r.line for c in idx.chains for r in c.rules)
    assert {ref.line for ref in rule_map.policies.values()} == {c.policy_line for c in idx.chains if c.policy_line}


@pytest.mark.lab
def test_loaded_edge_cases_map_exact_chains_and_fall_back_for_placed_rules(netns_tools, tmp_path):
    rules_file = tmp_path / "edge.nft"
    rules_file.write_text(NFT_EDGE_CASES)
    rule_map = attribute(load_and_list(tmp_path, "nft -f", rules_file),
                         index_source(Ruleset("nft", NFT_EDGE_CASES, "edge.nft")))
    assert rule_map.unmatched == (("ip", "filter", "user"),)
    by_chain = {}
    for (_, _, chain, _), ref in sorted(rule_map.rules.items()):
        by_chain.setdefault(chain, []).append(ref.line)
    assert by_chain == {"c": [6, 6, 17], "user": [None] * 4}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["table", "chain", "add", "rule", "insert", "flush", "ruleset", "delete", "inet", "t",
                                 "c", "{", "}", ";", "\n", '"', "#", "\\\n", "type filter hook input", "policy drop",
                                 "tcp dport 1 accept", "index 0", "elements = {", "-A", "-I", "*filter", ":INPUT",
                                 "2", "-D", "COMMIT"]), max_size=40), st.sampled_from(["nft", "iptables"]))
def test_indexing_never_raises_on_odd_text(words, fmt):
    idx = index_source(Ruleset(fmt, " ".join(words), "odd"))
    assert all(rule.line >= 1 for chain in idx.chains for rule in chain.rules)


# -- the fixes proposed for replies and FTP data channels ------------------------------------------
def test_a_dropped_reply_is_fixed_by_state_not_by_a_new_flow():
    assert reply_rule("iptables", "forward") == "-I FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    forward = index("rules.nft").base_chain("forward")
    assert reply_rule("nft", forward) == (f"insert rule {forward.family} {forward.table} {forward.name} "
                                          "ct state established,related accept")
    with pytest.raises(LabError):
        reply_rule("pf")


def test_a_dropped_ftp_data_channel_is_fixed_by_the_conntrack_helper():
    text = ftp_helper_rule("iptables", "198.18.1.10", 21)
    assert text == "-t raw -A PREROUTING -d 198.18.1.10/32 -p tcp -m tcp --dport 21 -j CT --helper ftp"
    nft = ftp_helper_rule("nft", "198.18.1.10", 21, table_hint=index("rules.nft").base_chain("forward"))
    assert 'type "ftp"' in nft and 'ct helper set "ftp-standard"' in nft and "hook prerouting" in nft


@pytest.mark.lab
@pytest.mark.parametrize("fmt", ["iptables", "nft"])
def test_the_proposed_fixes_load_into_the_users_own_ruleset(netns_tools, tmp_path, fmt):
    source = DATA / ("rules.v4" if fmt == "iptables" else "rules.nft")
    idx = index(source.name)
    forward = idx.base_chain("forward") or "forward"
    fixes = [allow_rule(fmt, "198.18.3.10", "198.18.1.10", "tcp", 9100, forward, insert=True),
             reply_rule(fmt, forward), ftp_helper_rule(fmt, "198.18.1.10", 21, table_hint=idx.base_chain("forward"))]
    if fmt == "iptables":
        load = "iptables-restore"
        apply = " && ".join(f"iptables {fix}" for fix in fixes)
    else:
        load = "nft -f"
        apply = " && ".join(f"nft '{fix}'" for fix in fixes)
    proc = subprocess.run(["unshare", "--net", "sh", "-c", f'{load} "$1" && {apply}', "sh", str(source)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, (apply, proc.stderr)


@pytest.mark.lab
@pytest.mark.parametrize("fmt, load, apply", [("iptables", "iptables-restore", "iptables {fix}"),
                                              ("nft", "nft -f", "nft '{fix}'")])
def test_a_generated_ruleset_maps_the_rules_of_its_jump_chains_and_takes_the_appended_fix(netns_tools, tmp_path,
                                                                                         fmt, load, apply):
    topology = load_topology("single-site")
    generated = rules.generate(topology, audit_plan(load_catalog(), topology), fmt)
    rules_file = tmp_path / f"generated.{fmt}"
    rules_file.write_text(generated.text)
    idx = index_source(generated)
    assert sum(c.hook is None for c in idx.chains) > 10  # the chains per source, reached by jumps
    rule_map = attribute(load_and_list(tmp_path, load, rules_file), idx)
    assert rule_map.unmatched == ()
    assert sorted(ref.line for ref in rule_map.rules.values()) == sorted(r.line for c in idx.chains for r in c.rules)
    # a blocked flow falls through its source's chains back to FORWARD: the fix is appended there
    forward = idx.base_chain("forward")
    fix = allow_rule(fmt, "198.18.3.10", "198.18.1.10", "tcp", 9100, forward)
    assert fix.startswith(("-A FORWARD ", "add rule inet safeq_lab forward ")), fix
    proc = subprocess.run(["unshare", "--net", "sh", "-c", f'{load} "$1" && {apply.format(fix=fix)}', "sh",
                           str(rules_file)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, (fix, proc.stderr)
