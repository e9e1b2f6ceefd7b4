"""The console views and the report files (report.json, junit.xml, report.html) on synthetic audits.

No lab: AuditReports are built by hand, or from the real single-site plan with the verdicts a
clean audit gives, so that the default console view is measured on the default lab's checks.
"""
from __future__ import annotations

import io
import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest

from emulator import report_files, report_html, report_json, report_junit
from emulator.audit import AuditReport, FlowVerdict
from emulator.catalog import Endpoint, load_catalog
from emulator.console import AuditConsole, colours_wanted
from emulator.evidence import Verdict
from emulator.pcap import ICMP_ERRORS, FindingPcap, bpf_filter, packet_count, pcap_name
from emulator.plan import Check, CheckKind, audit_plan
from emulator.report import format_console, format_diff
from emulator.report_model import Zones, findings, matrix
from emulator.topology import Enforcer, load_topology
from tests.support import junit_problems

SCREEN = 50  # lines: the default audit's console output fits one screen
FW = (Enforcer("fw", "forward"),)
ZONES = Zones(("servers", "devices", "users"), {"site1": "servers", "mfd1": "devices", "pc1": "users", "pc2": "users"})
PROFILE = {"version": "MU38", "security": "mixed", "choices": {"database": ["pgsql"]}}
RULE = "fw site.rules:12: -A FORWARD -p tcp -m tcp --dport 515 -j DROP"
FIX = "-I FORWARD 3 -s 198.18.3.10/32 -d 198.18.1.10/32 -p tcp -m tcp --dport 515 -j ACCEPT"


def check(kind, client, server, port, protocol="raw", flow="flow-1", transport="tcp"):
    return Check(kind, flow if kind == CheckKind.REQUIRED else None, client, server,
                 Endpoint(transport, protocol, port=port), enforcers=FW)


def synthetic(extra=(), profile=PROFILE, rules="fw: site.rules") -> AuditReport:
    verdicts = [
        FlowVerdict(check(CheckKind.REQUIRED, "pc1", "site1", 9100), Verdict.ALLOWED, "ok", "PJL INFO ok", elapsed=0.2),
        FlowVerdict(check(CheckKind.REQUIRED, "pc1", "site1", 515, "lpr"), Verdict.BLOCKED, "timeout", "",
                    "fw dropped the request (timeout)", 0.5, node="fw", direction="request", rule=RULE, fix=FIX),
        FlowVerdict(check(CheckKind.REQUIRED, "site1", "mfd1", 80, "http"), Verdict.UNENCRYPTED, "ok", "GET / -> 200",
                    "passed in clear although the flow offers TLS", 0.1),
        FlowVerdict(check(CheckKind.EXPOSURE, "pc2", "site1", 22, "ssh"), Verdict.EXPOSED, "knock", "",
                    "no catalog flow; let through by fw", node="fw", direction="request",
                    rule="fw site.rules:20: -A FORWARD -s 198.18.3.11 -p tcp --dport 22 -j ACCEPT"),
        FlowVerdict(check(CheckKind.EXPOSURE, "pc1", "mfd1", 3389, "rdp"), Verdict.CLOSED, "knock", "",
                    "dropped by fw", node="fw"),
        FlowVerdict(check(CheckKind.REQUIRED, "mfd1", "site1", 4096, "terminal"), Verdict.LAB_ERROR, "error", "",
                    "the probe failed: <boom> & \x00 \"quoted\"", 0.0),
        FlowVerdict(Check(CheckKind.NOT_EXERCISABLE, "flow-9", None, "site1", None, "USB reader"),
                    Verdict.NOT_EXERCISED, detail="USB reader"),
        *extra]
    return AuditReport("tiny", rules, verdicts, {"build": 1.5, "probe": 2.25}, profile, egress_drops=0)


# -- the console ----------------------------------------------------------------------------------
def test_default_view_lists_only_what_is_wrong_with_rule_and_fix():
    text = format_console(synthetic(), ZONES)
    lines = text.splitlines()
    wrong = [l for l in lines if re.search(r" (BLOCKED|EXPOSED|LAB-ERROR|UNENCRYPTED|ALLOWED|CLOSED)\b", l)
             and not l.startswith(("summary", "FAIL", "PASS"))]
    assert [next(v for v in ("BLOCKED", "EXPOSED", "LAB-ERROR") if v in l) for l in wrong] == \
        ["BLOCKED", "EXPOSED", "LAB-ERROR"]  # mixed profile: UNENCRYPTED is allowed, so not listed
    assert f"    why: {RULE}" in lines and f"    fix: {FIX}" in lines
    assert lines[-1].startswith("FAIL") and "exit status 11" in lines[-1]
    assert any(l.startswith("summary: ") for l in lines)


def test_matrix_rows_are_client_zones_and_cells_count_findings():
    lines = format_console(synthetic(), ZONES).splitlines()
    header = next(i for i, l in enumerate(lines) if l.startswith("from \\ to"))
    assert lines[header].split()[3:] == ["servers", "devices", "users"]
    rows = {l.split()[0]: l for l in lines[header + 1:header + 4]}
    assert re.search(r"\bB1 E1\b", rows["users"])            # pc1 -> site1 blocked, pc2 -> site1 exposed
    assert re.search(r"\bL1\b", rows["devices"])             # the lab fault from mfd1
    assert re.search(r"\bok 1\b", rows["servers"])           # site1 -> mfd1: unencrypted passes (mixed)
    cells = matrix(synthetic(), ZONES)
    assert cells[("users", "servers")].status == "fail" and cells[("devices", "servers")].status == "lab"
    assert cells[("users", "devices")].status == "closed" and cells[("servers", "users")].status == "none"


def test_secured_only_profile_makes_unencrypted_a_finding():
    report = synthetic(profile={**PROFILE, "security": "secured-only"})
    assert Verdict.UNENCRYPTED in {v.verdict for v in findings(report)}
    assert " UNENCRYPTED" in format_console(report, ZONES)
    assert Verdict.UNENCRYPTED not in {v.verdict for v in findings(synthetic())}


def test_quiet_is_the_totals_and_all_lists_every_check():
    quiet = format_console(synthetic(), ZONES, "quiet").splitlines()
    assert len(quiet) == 2 and quiet[0].startswith("summary: ") and quiet[1].startswith("FAIL")
    full = format_console(synthetic(), ZONES, "all")
    assert " CLOSED" in full and " ALLOWED" in full and "3389/tcp" in full


def clean_audit_of(topology_name: str) -> tuple[AuditReport, Zones]:
    """The verdicts a clean audit of the topology gives, over its real plan."""
    topology = load_topology(topology_name)
    by_kind = {CheckKind.REQUIRED: Verdict.ALLOWED, CheckKind.EXPOSURE: Verdict.CLOSED,
               CheckKind.LOCAL: Verdict.LOCAL, CheckKind.NO_PEER: Verdict.NO_PEER,
               CheckKind.NOT_EXERCISABLE: Verdict.NOT_EXERCISED}
    verdicts = [FlowVerdict(c, by_kind[c.kind] if c.enforcers or c.kind != CheckKind.REQUIRED else Verdict.SAME_SEGMENT,
                            certificate="pre-installed" if c.endpoint and c.endpoint.security != "plain" else "")
                for c in audit_plan(load_catalog(), topology)]
    timings = {k: 1.0 for k in ("build", "start", "probe", "sweep", "retry", "attribute", "teardown", "total")}
    return AuditReport(topology.name, "fw: generated", verdicts, timings, topology.profile.to_dict()), Zones.of(topology)


@pytest.mark.parametrize("topology", ["single-site", "branch-office"])
def test_the_default_audits_console_output_fits_one_screen(topology):
    report, zones = clean_audit_of(topology)
    out, err = io.StringIO(), io.StringIO()
    console = AuditConsole(out=out, err=err)  # StringIO is not a terminal: plain text
    console.report(format_console(report, zones))
    lines = out.getvalue().splitlines()
    assert len(lines) <= SCREEN, "\n".join(lines)
    assert lines[-1].startswith("PASS") and "\x1b" not in out.getvalue()
    assert "nothing is wrong" in out.getvalue()


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_colours_only_on_a_terminal_and_never_with_no_color():
    assert not colours_wanted(io.StringIO(), {})
    assert colours_wanted(_Tty(), {})
    assert not colours_wanted(_Tty(), {"NO_COLOR": "1"})
    assert colours_wanted(_Tty(), {"NO_COLOR": ""})  # an empty NO_COLOR is unset (no-color.org)
    text = format_console(synthetic(), ZONES)
    for environ, coloured in (({}, True), ({"NO_COLOR": "1"}, False)):
        out = _Tty()
        AuditConsole(out=out, err=io.StringIO(), environ=environ, quiet=True).report(text)
        assert ("\x1b[" in out.getvalue()) is coloured
        assert re.sub(r"\x1b\[[0-9;]*m", "", out.getvalue()).splitlines() == text.splitlines()


def test_progress_is_plain_lines_when_not_a_terminal_and_nothing_when_quiet():
    err = io.StringIO()
    console = AuditConsole(out=io.StringIO(), err=err)
    console.begin(3, "building the lab")
    console.progress("probe", "probing 3 required flow checks")
    console.note("safeq-lab: tiny up in 1.0s")
    lines = err.getvalue().splitlines()
    # nothing before the lab is up: an error while it is built stays the one line on standard error
    assert [l.split(" (")[0] for l in lines] == ["safeq-lab: probing 3 required flow checks", "safeq-lab: tiny up in 1.0s"]
    quiet = io.StringIO()
    console = AuditConsole(quiet=True, out=io.StringIO(), err=quiet)
    console.begin(3, "building the lab")
    console.progress("probe", "probing")
    console.note("up")
    assert quiet.getvalue() == ""


def test_differential_view_ends_with_the_second_audits_verdict():
    before = synthetic()
    fixed = [FlowVerdict(v.check, Verdict.ALLOWED, "ok") if v.verdict == Verdict.BLOCKED else v for v in before.verdicts]
    text = format_diff(before, AuditReport("tiny", "fw: fixed.rules", fixed))
    assert "BLOCKED -> ALLOWED" in text and text.splitlines()[-1].startswith("after the change: FAIL")


# -- report.json ----------------------------------------------------------------------------------
PCAPS = {synthetic().verdicts[1].check.key: FindingPcap("0001-BLOCKED-pc1-site1-515-tcp.pcap", "fw", 6)}


def test_json_document_is_versioned_and_carries_zones_findings_and_pcaps():
    report = synthetic()
    document = json.loads(report_json.render(report_json.audit_document(report, ZONES, PCAPS)))
    assert document["schema"] == report_json.SCHEMA == 3 and document["kind"] == "audit"
    assert document["zones"] == list(ZONES.names) and document["exit_status"] == report.exit_status
    listed = {v["id"]: v for v in document["verdicts"]}
    assert Verdict.CLOSED not in {v["verdict"] for v in listed.values()}  # listed only with --all
    assert [listed[i]["verdict"] for i in document["findings"]] == ["BLOCKED", "EXPOSED", "LAB-ERROR"]
    blocked = listed[1]
    assert blocked["rule"] == RULE and blocked["suggestion"] == FIX and blocked["wrong"]
    assert (blocked["client_zone"], blocked["server_zone"]) == ("users", "servers")
    assert blocked["pcap"] == "0001-BLOCKED-pc1-site1-515-tcp.pcap" and blocked["pcap_packets"] == 6
    assert listed[3]["suggestion"].startswith("narrow or remove the rule")
    cell = next(c for c in document["matrix"] if (c["client_zone"], c["server_zone"]) == ("users", "servers"))
    assert cell["status"] == "fail" and cell["counts"] == {"ALLOWED": 1, "BLOCKED": 1, "EXPOSED": 1}
    every = report_json.audit_document(report, ZONES, include_closed=True)
    assert len(every["verdicts"]) == len(report.verdicts) and every["closed_listed"]


def test_json_refuses_a_schema_it_does_not_know():
    with pytest.raises(ValueError, match="schema 2"):
        report_json.final_audit({"schema": 2, "kind": "audit"})


def differential() -> dict:
    before = synthetic()
    after = [FlowVerdict(v.check, Verdict.ALLOWED, "ok", rule="fw fixed.rules:3: -A FORWARD ... -j ACCEPT")
             if v.verdict == Verdict.BLOCKED else v for v in before.verdicts]
    return report_json.differential_document(before, AuditReport("tiny", "fw: fixed.rules", after, {}, PROFILE),
                                             ZONES)


def test_differential_document_lists_changed_checks_with_both_rules():
    document = differential()
    assert document["kind"] == "differential" and len(document["changed"]) == 1
    change = document["changed"][0]
    assert change["before"]["verdict"] == "BLOCKED" and change["before"]["rule"] == RULE
    assert change["after"]["verdict"] == "ALLOWED" and "fixed.rules:3" in change["after"]["rule"]
    assert report_json.final_audit(document) is document["after"]


# -- junit.xml ----------------------------------------------------------------------------------
def test_junit_validates_and_has_one_case_per_check_grouped_by_zone_pair():
    report = synthetic()
    text = report_junit.render(report, ZONES, PCAPS)
    assert junit_problems(text) == ""
    root = ET.fromstring(text)
    cases = root.findall("testsuite/testcase")
    assert len(cases) == len(report.verdicts) == int(root.get("tests"))
    suites = {s.get("name"): s for s in root.findall("testsuite")}
    assert list(suites) == ["servers -> servers", "servers -> devices", "devices -> servers", "users -> servers",
                            "users -> devices"]
    failures = root.findall("testsuite/testcase/failure")
    assert sorted(f.get("type") for f in failures) == ["BLOCKED", "EXPOSED"]
    blocked = next(f for f in failures if f.get("type") == "BLOCKED")
    assert f"rule: {RULE}" in blocked.text and f"fix: {FIX}" in blocked.text
    assert "pcap: pcap/0001-BLOCKED-pc1-site1-515-tcp.pcap (6 packets" in blocked.text
    assert [e.get("type") for e in root.findall("testsuite/testcase/error")] == ["LAB-ERROR"]
    assert "\x00" not in text and "<boom>" in ET.fromstring(text).find(".//error").get("message")
    assert [s.get("type") for s in root.findall("testsuite/testcase/skipped")] == ["NOT-EXERCISED"]
    assert suites["users -> servers"].get("failures") == "2" and root.get("failures") == "2"


def test_junit_schema_rejects_what_ci_servers_would_not_read():
    assert junit_problems('<testsuites><testsuite name="a"><testcase name="x"/></testsuite></testsuites>')
    assert junit_problems('<testsuites><testsuite name="a" tests="1" failures="0" errors="0">'
                          '<testcase/></testsuite></testsuites>')
    assert junit_problems('<testsuites><testsuite name="a" tests="1" failures="1" errors="0">'
                          '<testcase name="x" time="0.5"><failure message="m">t</failure></testcase>'
                          '</testsuite></testsuites>') == ""


# -- report.html ----------------------------------------------------------------------------------
class Dom(HTMLParser):
    """Elements with their attributes and text (enough to read the report's tables)."""

    def __init__(self, text: str):
        super().__init__()
        self.elements: list[dict] = []
        self._open: list[dict] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        element = {"tag": tag, **{k: v or "" for k, v in attrs}, "text": "", "children": []}
        if self._open:
            self._open[-1]["children"].append(element)
        self.elements.append(element)
        if tag not in ("meta", "input", "br", "link"):
            self._open.append(element)

    def handle_endtag(self, tag):
        while self._open:
            if self._open.pop()["tag"] == tag:
                break

    def handle_data(self, data):
        for element in self._open:
            element["text"] += data

    def find(self, tag, cls="", **attrs):
        return [e for e in self.elements if e["tag"] == tag and (not cls or cls in e.get("class", "").split())
                and all(e.get(k.replace("_", "-")) == v for k, v in attrs.items())]


def test_html_is_one_self_contained_page_with_matrix_findings_and_filter():
    report = synthetic()
    text = report_html.render(report_json.audit_document(report, ZONES, PCAPS))
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text), "nothing may be fetched"
    assert "<script src" not in text and "<link" not in text and "default-src 'none'" in text
    dom = Dom(text)
    cell = dom.find("td", "cell", data_client_zone="users", data_server_zone="servers")[0]
    assert cell["data-status"] == "fail" and cell["data-count-blocked"] == "1" and cell["data-count-exposed"] == "1"
    assert "s-fail" in cell["class"] and cell["text"] == "B1 E1"
    rows = {r["data-key"]: r for r in dom.find("tr", "finding")}
    blocked = rows[report.verdicts[1].check.key]
    rule = next(c for c in blocked["children"] if "rule" in c.get("class", ""))
    fix = next(c for c in blocked["children"] if "fix" in c.get("class", ""))
    assert rule["text"] == RULE and fix["text"] == FIX
    assert dom.find("a", "pcap", href="pcap/0001-BLOCKED-pc1-site1-515-tcp.pcap")
    assert len(dom.find("tr", "check")) == len(report.verdicts) - 1  # CLOSED counted, not listed
    assert dom.find("input", id="filter-text") and dom.find("select", id="filter-verdict")
    assert "SafeQ MU38, security mixed" in text and "probe" in dom.find("table", id="timings")[0]["text"]
    assert "&lt;boom&gt; &amp;" in text  # escaped


def test_html_of_a_differential_audit_shows_changes_side_by_side():
    dom = Dom(report_html.render(differential()))
    change = dom.find("tr", "change")
    assert len(change) == 1
    cells = [c["text"] for c in change[0]["children"] if c["tag"] == "td"]
    assert cells[1:3] == ["BLOCKED", RULE] and cells[3] == "ALLOWED" and "fixed.rules:3" in cells[4]


def test_report_dir_gets_three_files(tmp_path):
    report = synthetic()
    directory = report_files.prepare(str(tmp_path / "out"), pcap=True)
    (directory / "pcap" / "stale.pcap").write_bytes(b"")
    directory = report_files.prepare(str(tmp_path / "out"), pcap=True)
    assert not (directory / "pcap" / "stale.pcap").exists()
    written = report_files.write(directory, report_json.audit_document(report, ZONES), report, ZONES)
    assert sorted(p.name for p in written) == ["junit.xml", "report.html", "report.json"]
    assert junit_problems(directory / "junit.xml") == ""
    with pytest.raises(Exception, match="does not exist"):
        report_files.prepare(str(tmp_path / "no" / "such"))


# -- pcap naming and filters (the capture itself runs in tests/lab/test_reports_lab.py) -------------
def test_pcap_filters_name_the_checks_addresses_and_port():
    blocked = synthetic().verdicts[1]
    assert bpf_filter(blocked, "198.18.3.10", "198.18.1.10") == \
        f"host 198.18.3.10 and host 198.18.1.10 and ((tcp port 515) or ({ICMP_ERRORS}))"
    ftp = FlowVerdict(check(CheckKind.REQUIRED, "mfd1", "site1", 21, "ftp"), Verdict.BLOCKED)
    assert bpf_filter(ftp, "a", "b") == "host a and host b"  # data channels use other ports
    ping = FlowVerdict(check(CheckKind.REQUIRED, "pc1", "site1", None, "icmp", transport="icmp"), Verdict.BLOCKED)
    assert bpf_filter(ping, "a", "b") == "host a and host b"
    assert pcap_name(1, blocked) == "0001-BLOCKED-pc1-site1-515-tcp.pcap"


def test_packet_count_walks_the_record_headers(tmp_path):
    header = bytes.fromhex("d4c3b2a1020004000000000000000000ffff000071000000")
    record = lambda size: (b"\0" * 8) + size.to_bytes(4, "little") * 2 + b"x" * size
    path = tmp_path / "x.pcap"
    path.write_bytes(header + record(60) + record(0) + record(1500))
    assert packet_count(path) == 3
