"""A fleet of 200 devices (topologies/fleet-200.yaml) audited for real: every device is its own host
behind the firewall, and answers its own flows from its own address.

- the generated ruleset passes every required flow of every device, nothing is exposed, no lab fault;
- for every required flow a stub serves, the server's own request log names the client's address:
  each device's stubs saw the servers that polled it, and each server saw each device by its address;
- a command typed for a device (`mfd-0199 ...`, as in the `up` CLI) runs inside that device;
- the teardown leaves nothing behind.
"""
from __future__ import annotations

import pytest

from emulator import protocols, rules
from emulator.audit import run_audit
from emulator.catalog import load_catalog
from emulator.evidence import Verdict
from emulator.lab import Lab
from emulator.plan import CheckKind, audit_plan
from emulator.topology import load_topology
from tests.lab.helpers import footprint

pytestmark = pytest.mark.lab
FLEET = "fleet-200"
PASSING = {Verdict.ALLOWED, Verdict.UNENCRYPTED, Verdict.SAME_SEGMENT, Verdict.LOCAL, Verdict.NOT_EXERCISED}


def _logged(check) -> bool:
    """A required flow whose server is a stub of ours that records each valid request."""
    ep = check.endpoint
    return ep.transport in ("tcp", "udp") and ep.port is not None and protocols.module_for(ep.protocol).listen is not None


def test_a_fleet_of_200_devices_is_audited_device_by_device(lab_host, tmp_path, caplog):
    catalog = load_catalog()
    topology = load_topology(FLEET)
    devices = {h.name: h.address for h in topology.hosts if h.fleet}
    assert len(devices) >= 200
    assert len(set(devices.values())) == len(devices)  # an address of its own each
    checks = audit_plan(catalog, topology)
    with Lab(topology, catalog) as lab:
        lab.apply_rules(rules.generate(topology, checks))
        report = run_audit(lab, checks, "generated")
        log = lab.request_log()
        script = tmp_path / "commands"
        script.write_text("mfd-0199 ip -4 -o addr show\n")
        caplog.clear()
        lab.console(str(script))
        typed = caplog.text  # Mininet's CLI prints through its logger
    # the command ran inside the device: its one address, on its own interface
    assert f"mfd-0199-eth0    inet {devices['mfd-0199']}/" in typed, typed

    verdicts = report.verdicts
    failing = [(v.check.label(), v.verdict, v.detail) for v in verdicts if v.verdict not in PASSING
               and v.verdict != Verdict.CLOSED]
    assert failing == [], failing[:10]
    assert report.exit_status == 0

    seen = {(r["host"], r["transport"], int(r["port"]), r["peer"]) for r in log if "peer" in r}
    address = {h.name: h.address for h in topology.hosts}
    required = [c for c in checks if c.kind == CheckKind.REQUIRED and c.client_host != c.server_host]
    as_client = {d: 0 for d in devices}
    as_server = {d: 0 for d in devices}
    unseen = []
    for check in required:
        if not (check.client_host in devices or check.server_host in devices) or not _logged(check):
            continue
        key = (check.server_host, check.endpoint.transport, check.endpoint.port, address[check.client_host])
        if key not in seen:
            unseen.append(key)
        if check.client_host in devices:
            as_client[check.client_host] += 1
        if check.server_host in devices:
            as_server[check.server_host] += 1
    assert unseen == [], unseen[:10]
    # every device both asked and answered: flows of its own, from and to its own address
    assert min(as_client.values()) > 0 and min(as_server.values()) > 0
    assert footprint()["bridges"] == [] and footprint()["processes"] == []
