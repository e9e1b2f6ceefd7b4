"""Verdicts are a pure function of the check and its evidence: a table over every outcome."""
import pytest

from emulator.audit import AuditReport, EXIT_BLOCKED, EXIT_EXPOSED, EXIT_LAB_FAULT, FlowVerdict
from emulator.catalog import Endpoint, load_catalog
from emulator.evidence import Evidence, HopRecord, Verdict, judge
from emulator.plan import Check, CheckKind
from emulator.protocols.base import OUTCOMES, Outcome, ProbeResult
from emulator.report import diff, format_report
from emulator.topology import Enforcer

CLIENT = "198.18.3.10"
FW = (Enforcer("fw", "forward"),)


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


def first_flow(catalog, predicate):
    return next(f for f in catalog.flows if f.exercisable and predicate(f))


def plain_only(catalog):
    flow = first_flow(catalog, lambda f: all(e.security == "plain" for e in f.endpoints)
                      and f.endpoints[0].transport == "tcp")
    return flow, flow.endpoints[0]


def required(flow, ep, enforcers=FW):
    return Check(CheckKind.REQUIRED, flow.id, "pc1", "site1", ep, enforcers=enforcers)


def exposure(enforcers=FW):
    return Check(CheckKind.EXPOSURE, None, "pc1", "site1", Endpoint("tcp", "jmx", port=9898),
                 "no catalog flow", enforcers=enforcers)


def result(outcome, peer=CLIENT, detail="d"):
    return ProbeResult(id="0", outcome=outcome, elapsed=0.01, exchange="framed", detail=detail, peer_seen=peer)


def hop(seen=True, passed=True, replied=True, data=(), node="fw"):
    return HopRecord(node, "forward", seen, passed, replied, data)


def evidence(outcome="ok", hops=(hop(),), saw=frozenset({CLIENT}), up=True, encrypted=False, peer=CLIENT):
    return Evidence(result(outcome, peer) if outcome else None, tuple(hops), saw, up, CLIENT, encrypted)


def test_required_ok_is_allowed_or_unencrypted(catalog):
    flow, ep = plain_only(catalog)
    assert judge(required(flow, ep), evidence(), catalog).verdict == Verdict.ALLOWED
    both = first_flow(catalog, lambda f: any(e.security == "plain" for e in f.endpoints)
                      and any(e.security == "tls" for e in f.endpoints))
    plain = next(e for e in both.endpoints if e.security == "plain")
    tls = next(e for e in both.endpoints if e.security == "tls")
    assert judge(required(both, plain), evidence(), catalog).verdict == Verdict.UNENCRYPTED
    assert judge(required(both, tls), evidence(encrypted=True), catalog).verdict == Verdict.ALLOWED


def test_optional_tls_run_in_clear_is_counted_as_unencrypted(catalog):
    flow = first_flow(catalog, lambda f: any(e.security == "optional" for e in f.endpoints))
    ep = next(e for e in flow.endpoints if e.security == "optional")
    assert judge(required(flow, ep), evidence(), catalog).verdict == Verdict.UNENCRYPTED


@pytest.mark.parametrize("outcome", [o for o in OUTCOMES if o not in ("ok", "error")])
def test_a_firewall_drop_is_blocked_whatever_the_client_saw(catalog, outcome):
    flow, ep = plain_only(catalog)
    j = judge(required(flow, ep), evidence(outcome, hops=(hop(passed=False),)), catalog)
    assert j.verdict == Verdict.BLOCKED and j.node == "fw" and j.direction == "request"


@pytest.mark.parametrize("outcome", [o for o in OUTCOMES if o not in ("ok", "error")])
def test_a_failure_the_firewall_passed_is_broken_never_blocked(catalog, outcome):
    flow, ep = plain_only(catalog)
    j = judge(required(flow, ep), evidence(outcome, hops=(hop(replied=True),)), catalog)
    assert j.verdict == Verdict.BROKEN and outcome in j.detail


def test_the_probes_own_failure_is_a_lab_error_not_a_finding(catalog):
    flow, ep = plain_only(catalog)
    for hops in ((hop(),), (hop(passed=False),)):
        assert judge(required(flow, ep), evidence("error", hops=hops), catalog).verdict == Verdict.LAB_ERROR


def test_a_stub_that_is_down_is_no_service_not_blocked(catalog):
    flow, ep = plain_only(catalog)
    for outcome in ("refused", "timeout"):
        j = judge(required(flow, ep), evidence(outcome, hops=(hop(replied=False),), up=False), catalog)
        assert j.verdict == Verdict.NO_SERVICE


def test_a_dropped_reply_is_blocked_at_the_node_that_dropped_it(catalog):
    flow, ep = plain_only(catalog)
    hops = (hop(node="bfw"), hop(replied=False, node="fw"))
    j = judge(required(flow, ep, (Enforcer("bfw", "forward"), Enforcer("fw", "forward"))),
              evidence("timeout", hops=hops), catalog)
    assert (j.verdict, j.node, j.direction) == (Verdict.BLOCKED, "fw", "reply")


def test_the_first_node_that_dropped_decides(catalog):
    flow, ep = plain_only(catalog)
    hops = (hop(node="bfw"), hop(passed=False, node="fw"))
    j = judge(required(flow, ep), evidence("timeout", hops=hops), catalog)
    assert (j.verdict, j.node) == (Verdict.BLOCKED, "fw")


def test_a_dropped_ftp_data_channel_is_blocked(catalog):
    flow = first_flow(catalog, lambda f: any(e.protocol == "ftp" for e in f.endpoints))
    ep = next(e for e in flow.endpoints if e.protocol == "ftp")
    data = ((CLIENT, "198.18.1.12", "tcp", 30001),)
    j = judge(required(flow, ep), evidence("protocol_error", hops=(hop(data=data),)), catalog)
    assert (j.verdict, j.direction) == (Verdict.BLOCKED, "data")


def test_a_rewritten_source_address_is_broken(catalog):
    flow, ep = plain_only(catalog)
    j = judge(required(flow, ep), evidence(peer="198.18.1.1"), catalog)
    assert j.verdict == Verdict.BROKEN and "NAT" in j.detail
    j = judge(required(flow, ep), evidence(peer=None, saw=frozenset({"198.18.1.1"})), catalog)
    assert j.verdict == Verdict.BROKEN and "198.18.1.1" in j.detail


def test_the_server_log_must_agree_with_the_client(catalog):
    flow, ep = plain_only(catalog)
    j = judge(required(flow, ep), evidence(peer=None, saw=frozenset()), catalog)
    assert j.verdict == Verdict.BROKEN and "nothing" in j.detail


def test_a_passing_flow_the_firewall_never_saw_is_a_lab_error(catalog):
    flow, ep = plain_only(catalog)
    assert judge(required(flow, ep), evidence(hops=(hop(seen=False, passed=False),)), catalog).verdict == Verdict.LAB_ERROR


def test_same_segment_flows_are_labelled_never_graded(catalog):
    flow, ep = plain_only(catalog)
    for outcome in ("ok", "timeout", "refused"):
        assert judge(required(flow, ep, ()), evidence(outcome, hops=()), catalog).verdict == Verdict.SAME_SEGMENT


@pytest.mark.parametrize("hops, verdict", [
    ((hop(),), Verdict.EXPOSED),
    ((hop(passed=False),), Verdict.CLOSED),
    ((hop(node="bfw"), hop(passed=False)), Verdict.CLOSED),
    ((hop(seen=False, passed=False),), Verdict.LAB_ERROR),
])
def test_exposure_follows_the_firewalls_record(catalog, hops, verdict):
    assert judge(exposure(), evidence(None, hops=hops, saw=None), catalog).verdict == verdict


def test_unprobed_kinds(catalog):
    for kind, verdict in ((CheckKind.LOCAL, Verdict.LOCAL), (CheckKind.NO_PEER, Verdict.NO_PEER),
                          (CheckKind.NOT_EXERCISABLE, Verdict.NOT_EXERCISED)):
        assert judge(Check(kind, "x-01", "a", "a", None), None, catalog).verdict == verdict


def test_outcomes_are_an_enum_equal_to_their_json_strings():
    assert Outcome("silent") == "silent" and set(OUTCOMES) == {o.value for o in Outcome}


def test_exit_status_bits_summary_and_diff(catalog):
    flow, ep = plain_only(catalog)
    c = required(flow, ep)
    ok = FlowVerdict(c, Verdict.ALLOWED)
    blocked = FlowVerdict(c, Verdict.BLOCKED, rule="fw rules.v4:7: no rule matched: chain FORWARD policy DROP")
    exposed = FlowVerdict(exposure(), Verdict.EXPOSED)
    down = FlowVerdict(c, Verdict.NO_SERVICE)
    assert AuditReport("t", "r", [ok]).exit_status == 0
    assert AuditReport("t", "r", [ok, blocked]).exit_status == EXIT_BLOCKED
    assert AuditReport("t", "r", [ok, exposed]).exit_status == EXIT_EXPOSED
    assert AuditReport("t", "r", [ok, down]).exit_status == EXIT_LAB_FAULT
    text = format_report(AuditReport("t", "r", [ok, blocked, exposed]))
    assert "BLOCKED" in text and "EXPOSED" in text and "why: fw rules.v4:7" in text
    assert text.splitlines()[-1].startswith("FAIL")
    changed = diff(AuditReport("t", "a", [ok]), AuditReport("t", "b", [blocked]))
    assert [(old.verdict, new.verdict) for old, new in changed] == [(Verdict.ALLOWED, Verdict.BLOCKED)]


def test_on_a_lossy_path_a_silence_is_a_lab_error_naming_the_link_not_a_finding(catalog):
    flow, ep = plain_only(catalog)
    lossy = "the devices link loses 100 % of packets"
    unseen = Evidence(result("timeout"), (hop(seen=False, passed=False, replied=False),), frozenset(), True, CLIENT,
                      path_loss=lossy)
    j = judge(required(flow, ep), unseen, catalog)
    assert j.verdict == Verdict.LAB_ERROR and lossy in j.detail
    unanswered = Evidence(result("timeout"), (hop(replied=False),), frozenset(), True, CLIENT, path_loss=lossy)
    j = judge(required(flow, ep), unanswered, catalog)
    assert j.verdict == Verdict.LAB_ERROR and "may have been lost there, not filtered" in j.detail
    # a node that dropped the request is still the finding, loss or not
    dropped = Evidence(result("timeout"), (hop(passed=False, replied=False),), frozenset(), True, CLIENT,
                       path_loss=lossy)
    assert judge(required(flow, ep), dropped, catalog).verdict == Verdict.BLOCKED
    # without loss on the path the unanswered request is the stateless-rule finding
    assert judge(required(flow, ep), evidence("timeout", hops=(hop(replied=False),)), catalog).verdict == Verdict.BLOCKED


def test_path_loss_names_only_lossy_links_on_the_checks_path():
    from emulator.audit import path_loss
    from emulator.topology import load_topology

    topology = load_topology("branch-office")
    check = Check(CheckKind.REQUIRED, "x", "pc1", "site1", Endpoint("tcp", "http", port=80),
                  enforcers=(Enforcer("fw", "forward"),))
    zone = topology.host("pc1").zone
    assert path_loss(check, topology, {zone: 5.0, "branch": 50.0}) == f"the {zone} link loses 5 % of packets"
    assert path_loss(check, topology, {"branch": 50.0}) == ""


def test_the_explainer_parses_a_trace_only_when_asked_and_finds_what_a_scan_would():
    from pathlib import Path

    from emulator.audit import Explainer
    from emulator.trace import Fate, parse_trace

    text = (Path(__file__).resolve().parents[1] / "data" / "trace" / "iptables.trace").read_text()
    why = Explainer({}, {}, {"fw": text})
    assert why._by_pair == {}  # nothing parsed yet: an audit without findings never pays for it
    traced = parse_trace(text)
    asked = {(p.saddr, p.daddr, p.protocol, p.dport, p.fate) for p in traced if p.decision is not None}
    assert len(asked) > 5
    for src, dst, transport, port, fate in asked:
        scan = next(p.decision for p in traced if p.decision is not None and p.fate == fate
                    and p.protocol == transport and (p.saddr, p.daddr) == (src, dst)
                    and (transport == "icmp" or p.dport == port))
        assert why.decision("fw", src, dst, transport, port, (fate,)) == scan
    assert why.decision("fw", "198.18.99.1", "198.18.99.2", "tcp", 1, tuple(Fate)) is None
    assert why.decision("other-node", *next(iter(asked))[:4], tuple(Fate)) is None


def test_the_exposure_shortcut_gives_the_verdict_the_whole_evidence_gives(catalog):
    """`exposure_verdict` reads the common case (dropped by the path's first node) straight off the
    record: on random records of a two-firewall lab it must agree with `judge` over `evidence_for`."""
    import random

    from emulator import witness
    from emulator.audit import _verdict, evidence_for, exposure_verdict
    from emulator.plan import audit_plan
    from emulator.topology import load_topology

    topology = load_topology("branch-office")
    exposures = [c for c in audit_plan(catalog, topology) if c.kind == CheckKind.EXPOSURE]
    assert any(len(c.enforcers) > 1 for c in exposures)
    nodes = sorted({e.node for c in exposures for e in c.enforcers})
    hosts = sorted({c.client_host for c in exposures})
    rng = random.Random(7)
    shortcuts = 0
    for _round in range(6):
        sweep = {node: witness.FirewallRecord(node) for node in nodes[1:] if rng.random() < 0.9}  # a node unread
        for check in rng.sample(exposures, len(exposures) // 3):
            ep = check.endpoint
            key = (topology.host(check.client_host).address, topology.host(check.server_host).address, ep.transport, ep.port)
            for enforcer in check.enforcers:
                if enforcer.node in sweep and rng.random() < 0.7:
                    sweep[enforcer.node].passed.add(key)
        complete = {node: rng.random() < 0.8 for node in nodes}
        dead = {host: "exited" for host in rng.sample(hosts, 2)}
        lossy = {topology.host(hosts[0]).zone: 5.0} if _round % 2 else {}
        for check in rng.sample(exposures, 1500):
            whole = _verdict(check, judge(check, evidence_for(check, topology, None, sweep, {}, dead, complete, lossy),
                                          catalog), None)
            assert exposure_verdict(check, topology, sweep, {}, dead, complete, lossy, catalog) == whole
            shortcuts += whole.verdict == Verdict.CLOSED and whole.node == check.enforcers[0].node
    assert shortcuts > 1000  # the common case was exercised, not only the fallback


def test_unanswered_probes_are_probed_again_unless_the_verdict_stands_on_its_own():
    from emulator.audit import probed_again
    from emulator.topology import load_topology

    topology = load_topology("branch-office")
    zone = topology.host("pc1").zone
    check = Check(CheckKind.REQUIRED, "x", "pc1", "site1", Endpoint("tcp", "http", port=80),
                  enforcers=(Enforcer("fw", "forward"),))
    knock = Check(CheckKind.EXPOSURE, None, "pc1", "site1", Endpoint("tcp", "jmx", port=9898), "no catalog flow",
                  enforcers=(Enforcer("fw", "forward"),))
    checks = [check] * 6 + [knock]
    verdicts = {
        0: FlowVerdict(check, Verdict.BROKEN, "timeout"),     # passed, unanswered: a busy stub?
        1: FlowVerdict(check, Verdict.LAB_ERROR, "timeout"),  # no node's record: the request never left?
        2: FlowVerdict(check, Verdict.LAB_ERROR, "silent"),
        3: FlowVerdict(check, Verdict.BLOCKED, "timeout"),    # a node's record of the drop: a finding
        4: FlowVerdict(check, Verdict.LAB_ERROR, "error"),    # the probe itself failed
        5: FlowVerdict(check, Verdict.BROKEN, "refused"),     # answered
        6: FlowVerdict(knock, Verdict.LAB_ERROR, "knock"),
    }
    # the knock said 0 and 1 were dropped: only the unrecorded one keeps its short timeout
    assert probed_again(verdicts, checks, topology, {}, {0, 1}) == ([0, 1, 2], {1})
    # on a lossy path the loss is the lesson: only the firewall's BROKEN is probed again
    assert probed_again(verdicts, checks, topology, {zone: 5.0}, {0, 1}) == ([0], set())
