"""Verdicts are a pure function of the check and the probe outcome."""
import pytest

from emulator.audit import AuditReport, format_report, judge, EXIT_BLOCKED, EXIT_EXPOSED
from emulator.catalog import load_catalog
from emulator.plan import Check
from emulator.protocols.base import ProbeResult


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


def first_flow(catalog, predicate):
    return next(f for f in catalog.flows if f.exercisable and predicate(f))


def required(flow, ep):
    return Check("required", flow.id, "a", "b", ep)


def result(outcome, peer="198.18.3.10"):
    return ProbeResult(id="0", outcome=outcome, elapsed=0.01, exchange="framed", detail="d", peer_seen=peer)


def test_required_ok_is_allowed_or_unencrypted(catalog):
    only_plain = first_flow(catalog, lambda f: all(e.security == "plain" for e in f.endpoints))
    assert judge(required(only_plain, only_plain.endpoints[0]), result("ok"), catalog, "198.18.3.10").verdict == "ALLOWED"
    both = first_flow(catalog, lambda f: any(e.security == "plain" for e in f.endpoints)
                      and any(e.security == "tls" for e in f.endpoints))
    plain = next(e for e in both.endpoints if e.security == "plain")
    tls = next(e for e in both.endpoints if e.security == "tls")
    assert judge(required(both, plain), result("ok"), catalog, "198.18.3.10").verdict == "UNENCRYPTED"
    assert judge(required(both, tls), result("ok"), catalog, "198.18.3.10").verdict == "ALLOWED"


@pytest.mark.parametrize("outcome, verdict", [("timeout", "BLOCKED"), ("refused", "BLOCKED"),
                                              ("unreachable", "BLOCKED"), ("protocol_error", "BROKEN")])
def test_required_failures(catalog, outcome, verdict):
    flow = first_flow(catalog, lambda f: True)
    assert judge(required(flow, flow.endpoints[0]), result(outcome), catalog).verdict == verdict


def test_a_rewritten_source_address_is_broken(catalog):
    flow = first_flow(catalog, lambda f: True)
    v = judge(required(flow, flow.endpoints[0]), result("ok", peer="198.18.1.1"), catalog, "198.18.3.10")
    assert v.verdict == "BROKEN" and "NAT" in v.detail


@pytest.mark.parametrize("outcome, verdict", [("ok", "EXPOSED"), ("protocol_error", "EXPOSED"),
                                              ("timeout", "CLOSED"), ("refused", "CLOSED")])
def test_exposure(catalog, outcome, verdict):
    flow = first_flow(catalog, lambda f: True)
    check = Check("exposure", None, "pc1", "site1", flow.endpoints[0])
    assert judge(check, result(outcome), catalog).verdict == verdict


def test_exit_status_bits_and_summary(catalog):
    flow = first_flow(catalog, lambda f: True)
    ep = flow.endpoints[0]
    blocked = judge(required(flow, ep), result("timeout"), catalog)
    exposed = judge(Check("exposure", None, "pc1", "site1", ep), result("ok"), catalog)
    ok = judge(required(flow, ep), result("ok"), catalog)
    assert AuditReport("t", "r", [ok]).exit_status == 0
    assert AuditReport("t", "r", [ok, blocked]).exit_status == EXIT_BLOCKED
    assert AuditReport("t", "r", [ok, exposed]).exit_status == EXIT_EXPOSED
    text = format_report(AuditReport("t", "r", [ok, blocked, exposed]))
    assert "BLOCKED" in text and "EXPOSED" in text and text.splitlines()[-1].startswith("FAIL")
