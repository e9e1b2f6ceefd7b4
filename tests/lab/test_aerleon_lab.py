"""The Aerleon export for real: both renderings load, and the default lab audits green through each."""
from __future__ import annotations

import pytest

from emulator import aerleon_policy, rules
from emulator.audit import run_audit
from emulator.catalog import load_catalog
from emulator.lab import Lab
from emulator.plan import audit_plan
from emulator.topology import load_topology
from tests.lab.helpers import footprint

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def plan():
    catalog = load_catalog()
    topology = load_topology("single-site")
    return catalog, topology, audit_plan(catalog, topology)


@pytest.fixture(scope="module")
def files(plan):
    _catalog, topology, checks = plan
    return aerleon_policy.policy_files(topology, checks)


@pytest.fixture(scope="module")
def default_lab(lab_host, plan):
    catalog, topology, checks = plan
    with Lab(topology, catalog) as lab:
        yield lab, checks
    assert footprint() == {"bridges": [], "processes": [], "state": [], "mininet_shells": []}


def crossing(lab, check):
    t = lab.topology
    return t.host(check.client_host).zone != t.host(check.server_host).zone


@pytest.mark.parametrize("target", aerleon_policy.TARGETS)
def test_the_rendering_loads_for_real(lab_host, files, target):
    """iptables-restore / nft -f in a throwaway network namespace accept the whole ruleset."""
    rules.validate(aerleon_policy.to_ruleset(files, target))


@pytest.mark.parametrize("target", aerleon_policy.TARGETS)  # iptables, then nftables, on one lab
def test_aerleon_rules_pass_every_crossing_flow_and_expose_nothing(default_lab, files, target):
    lab, checks = default_lab
    ruleset = aerleon_policy.to_ruleset(files, target)
    lab.apply_rules(ruleset)
    report = run_audit(lab, checks, ruleset.source)
    required = [v for v in report.verdicts if v.check.kind == "required" and crossing(lab, v.check)]
    failed = [v for v in required if v.verdict not in ("ALLOWED", "UNENCRYPTED")]
    assert required and failed == [], [(v.check.key, v.verdict, v.observed, v.detail) for v in failed[:10]]
    # FTP data channels need the conntrack helper to_ruleset appends: both modes were exercised
    assert {v.check.variant for v in required if v.check.endpoint.protocol == "ftp"} == {"passive", "active"}
    exposed = [v for v in report.verdicts if v.verdict == "EXPOSED"]
    assert exposed == [], [(v.check.key, v.detail) for v in exposed[:10]]
