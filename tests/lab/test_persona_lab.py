"""A device recorded from a real one, end to end: `safeq-lab persona import` turns an snmpwalk and an
ipptool capture into a persona file, a topology gives that persona to a lab host, and net-snmp and
CUPS's ipptool, run in another lab host, read the captured values back from the stub."""
from __future__ import annotations

from pathlib import Path

import pytest

from emulator import persona_import
from emulator.catalog import load_catalog
from emulator.lab import Lab
from emulator.plan import listeners_for
from emulator.topology import load_topology
from tests.lab.helpers import footprint, run_cli

pytestmark = pytest.mark.lab

DATA = Path(__file__).resolve().parents[1] / "data" / "personas"
WALK, IPP_CAPTURE = DATA / "ricoh-im-c3000.walk", DATA / "ricoh-im-c3000.ipptool.txt"
PERSONA = "ricoh-im-c3000"


def recorded_topology(tmp_path: Path) -> str:
    imported = run_cli("persona", "import", PERSONA, "--snmp", str(WALK), "--ipp", str(IPP_CAPTURE),
                       "-o", str(tmp_path / "recorded.yaml"))
    assert imported.returncode == 0, imported.stderr
    path = tmp_path / "recorded-site.yaml"
    path.write_text(
        "name: recorded-site\nfirewall: fw\npersonas: [recorded.yaml]\nzones:\n"
        "  - name: devices\n    subnet: 198.18.102.0/24\n    hosts:\n"
        f"      - {{name: ricoh1, roles: [mfd, mfd-ricoh], persona: {PERSONA}}}\n"
        "      - {name: ricoh2, roles: [mfd, mfd-ricoh]}\n"
        "      - {name: pc9, roles: [user]}\n")
    return str(path)


def served_walk(lab, host: str, out: Path) -> dict:
    address = lab.topology.host(host).address
    walked = lab.node("pc9").popen(["snmpwalk", "-v2c", "-c", "public", "-On", "-t", "3", address, ".1"],
                                   stdout=-1, stderr=-1, text=True)
    stdout, stderr = walked.communicate(timeout=120)
    assert walked.returncode == 0, stderr
    out.write_text(stdout)
    return persona_import.parse_walk(out)


def ipptool_attributes(lab, host: str, home: Path) -> str:
    spec = lab.topology.host(host)
    port = next(l.port for l in listeners_for(lab.catalog, spec, lab.topology.profile)
                if l.protocol == "ipp" and l.security == "plain")
    home.mkdir(exist_ok=True)
    asked = lab.node("pc9").popen(["ipptool", "-T", "10", "-tv", f"ipp://{spec.address}:{port}/ipp/print",
                                   "get-printer-attributes.test"], stdout=-1, stderr=-1, text=True,
                                  env={"PATH": "/usr/bin:/bin", "HOME": str(home)})
    stdout, stderr = asked.communicate(timeout=120)
    assert asked.returncode == 0, stdout[-2000:] + stderr[-2000:]
    return stdout


def test_a_recorded_device_answers_with_its_captured_values(lab_host, tmp_path):
    topology = load_topology(recorded_topology(tmp_path))
    captured = persona_import.parse_walk(WALK)
    uptime = persona_import.SYS_UPTIME
    with Lab(topology, load_catalog()) as lab:
        recorded = served_walk(lab, "ricoh1", tmp_path / "ricoh1.walk")
        generic = served_walk(lab, "ricoh2", tmp_path / "ricoh2.walk")
        recorded_ipp = ipptool_attributes(lab, "ricoh1", tmp_path / "home")
        generic_ipp = ipptool_attributes(lab, "ricoh2", tmp_path / "home")
    assert footprint() == {"bridges": [], "processes": [], "state": [], "mininet_shells": []}
    expected = {oid: value for oid, value in captured.items() if oid != uptime}
    assert {oid: recorded.get(oid) for oid in expected} == expected
    # the host without the persona serves the vendor's defaults, not the capture
    assert {oid: generic.get(oid) for oid in expected} != expected
    for line in ("printer-make-and-model (textWithoutLanguage) = RICOH IM C3000",
                 "marker-levels (1setOf integer) = 70,64,44,69",
                 "printer-resolution-supported (1setOf resolution) = 600dpi,1200dpi"):
        assert line in recorded_ipp, line
    # the shipped Ricoh persona is the same model, but its (invented) toner levels are not the capture's
    assert "marker-levels (1setOf integer) = 70,64,44,69" not in generic_ipp


def test_a_topology_naming_an_unknown_persona_is_refused_in_one_line(tmp_path):
    path = Path(recorded_topology(tmp_path))
    path.write_text(path.read_text().replace(f"persona: {PERSONA}", "persona: nobody"))
    done = run_cli("topology", "--topology", str(path))
    assert done.returncode != 0
    assert done.stderr.strip().count("\n") == 0 and "unknown persona 'nobody'" in done.stderr, done.stderr
