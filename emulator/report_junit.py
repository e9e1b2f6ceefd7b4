"""junit.xml: every check of an audit as a JUnit test case, for CI servers.

The format is the one Jenkins, GitLab, GitHub Actions' test reporters and Azure DevOps read (Ant's
JUnit report; tests/data/junit.xsd describes it and the tests validate against it):
`<testsuites>` holds one `<testsuite>` per (client zone, server zone) pair, named
"CLIENT-ZONE -> SERVER-ZONE", in the topology's zone order; each check is one `<testcase>`
(classname `safeq-lab.CLIENT-ZONE.SERVER-ZONE`, name `FLOW CLIENT -> SERVER PORT/TRANSPORT`, time
the probe's seconds). A check that is wrong (emulator.report_model.is_wrong) is a `<failure>` whose
type is its verdict and whose message is the reason, with the responsible rule, the suggested fix
and the finding's pcap in its text; a lab fault (NO-SERVICE, LAB-ERROR) is an `<error>`; a check
that is not graded (SAME-SEGMENT, LOCAL, NO-PEER, NOT-EXERCISED) is `<skipped>`. Every check is a
test case, closed exposure knocks included (tens of thousands in the default lab).
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections import defaultdict

from emulator import report_model
from emulator.audit import AuditReport, FlowVerdict
from emulator.evidence import LAB_FAULTS, Verdict
from emulator.report_model import Zones

NOT_GRADED = (Verdict.SAME_SEGMENT, Verdict.LOCAL, Verdict.NO_PEER, Verdict.NOT_EXERCISED)
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")  # characters XML 1.0 cannot carry


def _clean(text) -> str:
    return _NOT_XML.sub("\N{REPLACEMENT CHARACTER}", str(text))


def suite_name(client_zone: str, server_zone: str) -> str:
    return f"{client_zone} -> {server_zone}"


def render(report: AuditReport, zones: Zones, pcaps: dict | None = None, pcap_dir: str = "pcap") -> str:
    pcaps = pcaps or {}
    forbid = report_model.forbids_clear_text(report)
    by_pair: dict[tuple[str, str], list[FlowVerdict]] = defaultdict(list)
    for v in report.verdicts:
        by_pair[zones.pair(v)].append(v)
    order = {z: i for i, z in enumerate(zones.names)}
    root = ET.Element("testsuites", name=_clean(f"safeq-lab audit of {report.topology}"))
    totals = {"tests": 0, "failures": 0, "errors": 0}
    for pair in sorted(by_pair, key=lambda p: (order.get(p[0], len(order)), order.get(p[1], len(order)), p)):
        suite = _suite(root, pair, by_pair[pair], report, forbid, pcaps, pcap_dir)
        for key in totals:
            totals[key] += int(suite.get(key))
    root.set("tests", str(totals["tests"]))
    root.set("failures", str(totals["failures"]))
    root.set("errors", str(totals["errors"]))
    root.set("time", f"{sum(report.timings.values()):.3f}")
    ET.indent(root, space=" ")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _suite(root, pair, verdicts: list[FlowVerdict], report: AuditReport, forbid: bool, pcaps: dict, pcap_dir: str):
    suite = ET.SubElement(root, "testsuite", name=_clean(suite_name(*pair)))
    properties = ET.SubElement(suite, "properties")
    for name, value in (("topology", report.topology), ("rules", report.rules),
                        ("profile", " ".join(f"{k}={v}" for k, v in (report.profile or {}).items()))):
        ET.SubElement(properties, "property", name=name, value=_clean(value))
    counts = {"failures": 0, "errors": 0, "skipped": 0}
    for v in verdicts:
        outcome = _case(suite, v, pair, forbid, pcaps.get(v.check.key), pcap_dir)
        if outcome:
            counts[outcome] += 1
    suite.set("tests", str(len(verdicts)))
    for key, n in counts.items():
        suite.set(key, str(n))
    suite.set("time", f"{sum(v.elapsed for v in verdicts):.3f}")
    return suite


def _case(suite, v: FlowVerdict, pair, forbid: bool, pcap, pcap_dir: str) -> str:
    """Add the check's test case; which count it adds to ('' for a pass)."""
    case = ET.SubElement(suite, "testcase", classname=_clean("safeq-lab." + ".".join(pair)),
                         name=_clean(report_model.check_name(v)), time=f"{v.elapsed:.3f}")
    reason = f"{v.verdict}: {v.detail}" if v.detail else str(v.verdict)
    if report_model.is_wrong(v, forbid):
        lines = [f"reason: {v.detail or v.verdict}", f"expected: {v.expected}, observed: {v.observed or '-'}"]
        lines += [f"rule: {v.rule}"] if v.rule else []
        suggestion = report_model.suggestion(v)
        lines += [f"fix: {suggestion}"] if suggestion else []
        if pcap is not None and pcap.name:
            lines.append(f"pcap: {pcap_dir}/{pcap.name} ({pcap.packets} packets, captured on {pcap.node})")
        tag = "error" if v.verdict in LAB_FAULTS else "failure"
        ET.SubElement(case, tag, type=str(v.verdict), message=_clean(reason)).text = _clean("\n".join(lines))
        if v.exchange:
            ET.SubElement(case, "system-out").text = _clean(v.exchange)
        return "errors" if tag == "error" else "failures"
    if v.verdict in NOT_GRADED:
        ET.SubElement(case, "skipped", type=str(v.verdict), message=_clean(reason))
        return "skipped"
    return ""
