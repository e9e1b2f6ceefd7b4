"""Passive and active FTP scan upload through the firewall node, with and without the conntrack helper."""
from __future__ import annotations

import pytest

from emulator import rules
from emulator.audit import run_audit
from emulator.catalog import load_catalog
from emulator.lab import Lab
from emulator.plan import audit_plan
from emulator.topology import load_topology
from tests.lab.helpers import small_topology

pytestmark = pytest.mark.lab


def without_ftp_helper(ruleset: rules.Ruleset) -> rules.Ruleset:
    """The catalog's rules minus the FTP conntrack helper: only the control port 21 stays open."""
    lines = [l for l in ruleset.text.splitlines() if "--helper ftp" not in l]
    return rules.Ruleset("iptables", "\n".join(lines) + "\n", "generated, no FTP helper")


def test_ftp_data_channels_need_the_conntrack_helper(lab_host, tmp_path):
    catalog = load_catalog()
    topology = load_topology(small_topology(tmp_path))
    checks = audit_plan(catalog, topology, exposures=False)
    ftp = [c for c in checks if c.kind == "required" and c.endpoint.protocol == "ftp"]
    assert {c.variant for c in ftp} == {"passive", "active"}
    generated = rules.generate(topology, checks)
    with Lab(topology, catalog) as lab:
        lab.apply_rules(generated)
        report = run_audit(lab, checks, generated.source)
        by_variant = {v.check.variant: v for v in report.verdicts if v.check in ftp}
        for variant, verdict in by_variant.items():
            assert verdict.observed == "ok" and verdict.verdict == "ALLOWED", (variant, verdict)
            assert "FTP" in verdict.exchange.upper() and "framed" not in verdict.exchange, verdict.exchange
        lab.apply_rules(without_ftp_helper(generated))
        report = run_audit(lab, checks, "no helper")
        by_variant = {v.check.variant: v for v in report.verdicts if v.check in ftp}
        for variant, verdict in by_variant.items():
            # the control connection works; the firewall's own record shows the data connection dropped
            assert verdict.observed == "protocol_error" and verdict.verdict == "BLOCKED", (variant, verdict)
            assert verdict.direction == "data" and "data channel" in verdict.detail, verdict.detail
