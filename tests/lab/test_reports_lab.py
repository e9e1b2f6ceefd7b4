"""`safeq-lab audit --report DIR --pcap` on the planted-defects site (issue 12, items 1-3).

The ruleset is tests/data/defects.rules; the findings it must give are computed from the defect
definitions of tests/lab/test_planted_defects.py over the plan (never from the audit's output).
One audit, then: junit.xml validates against tests/data/junit.xsd with one failing case per
expected finding; report.html, opened in headless Chromium, shows each finding in the zone matrix
and its responsible rule, with no console message; each finding's pcap is readable by
`tcpdump -r` and holds the probe's packets; and the default console view of the default lab
fits one 50-line screen.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections import Counter
from html.parser import HTMLParser

import pytest

from emulator.audit import EXIT_BLOCKED, EXIT_EXPOSED
from emulator.plan import audit_plan
from emulator.topology import load_topology
from tests.support import junit_problems
from tests.lab.helpers import footprint, policy_line, run_cli
from tests.lab.test_planted_defects import CATALOG, PLANTED, TOPOLOGY, hit_by, path_of, planted_line

pytestmark = pytest.mark.lab
CLEAN = {"bridges": [], "processes": [], "state": [], "mininet_shells": []}
RULES = path_of("defects", "rules")
SCREEN = 50
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


@pytest.fixture(scope="module")
def audited(lab_host, tmp_path_factory):
    """The CLI's audit of the defects site with --report and --pcap; (process, report dir, expected)."""
    out = tmp_path_factory.mktemp("reports") / "report"
    proc = run_cli("audit", "--topology", str(TOPOLOGY), "--rules", str(RULES), "--report", str(out), "--pcap",
                   "--timeout", "2", timeout=300)
    assert footprint() == CLEAN
    assert proc.returncode == EXIT_BLOCKED | EXIT_EXPOSED, proc.stdout[-3000:] + proc.stderr[-2000:]
    topology = load_topology(str(TOPOLOGY))
    checks = audit_plan(CATALOG, topology)
    expected = {}  # check key -> (verdict, the line of defects.rules the finding must name, check)
    for defect in PLANTED:
        line = policy_line(RULES) if defect.blame == "policy" else planted_line(RULES, defect.name)
        for c in hit_by(topology, defect, checks):
            expected[c.key] = (str(defect.verdict), line, c)
    assert expected
    return proc, out, expected, topology


def case_name(c) -> str:
    return f"{c.flow_id or 'exposure'} {c.client_host} -> {c.server_host} {c.label}"


def test_the_console_lists_each_finding_and_ends_with_the_verdict(audited):
    proc, out, expected, _topology = audited
    lines = proc.stdout.splitlines()
    assert lines[-1].startswith("FAIL") and "exit status 3" in lines[-1]
    listed = [l for l in lines if re.search(r" (BLOCKED|EXPOSED)\b", l) and not l.startswith(("summary", "FAIL"))]
    assert len(listed) == len(expected), "\n".join(listed)
    assert not [l for l in lines if " ALLOWED " in l and not l.startswith("summary")]  # only what is wrong
    assert f"report in {out}/" in proc.stderr


def test_junit_validates_with_one_failing_case_per_planted_finding(audited):
    _proc, out, expected, _topology = audited
    assert junit_problems(out / "junit.xml") == ""
    root = ET.parse(out / "junit.xml").getroot()
    failing = {case.get("name"): case.find("failure") for case in root.iter("testcase")
               if case.find("failure") is not None}
    assert not list(root.iter("error")), "no lab fault expected"
    want = {case_name(c): (verdict, line) for verdict, line, c in expected.values()}
    assert set(failing) == set(want)
    for name, failure in failing.items():
        verdict, line = want[name]
        assert failure.get("type") == verdict, name
        assert f"{RULES}:{line}: " in failure.text, (name, failure.text)
    assert int(root.get("failures")) == len(expected)
    assert int(root.get("tests")) == sum(1 for _ in root.iter("testcase"))


class Dom(HTMLParser):
    """Elements of a page with their attributes and text."""

    def __init__(self, text: str):
        super().__init__()
        self.elements, self._open = [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        element = {"tag": tag, **{k: v or "" for k, v in attrs}, "text": ""}
        self.elements.append(element)
        if tag not in ("meta", "input", "br", "link", "img"):
            self._open.append(element)

    def handle_endtag(self, tag):
        while self._open and self._open.pop()["tag"] != tag:
            pass

    def handle_data(self, data):
        for element in self._open:
            element["text"] += data


def browser() -> str:
    found = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if found is None:
        pytest.fail("headless Chromium is needed to check report.html: `apt-get install chromium`")
    return found


def test_html_shows_each_finding_in_the_matrix_with_its_rule_and_no_console_errors(audited, tmp_path):
    _proc, out, expected, topology = audited
    page = (out / "report.html").resolve()
    common = [browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--enable-logging=stderr", "--v=0", f"--user-data-dir={tmp_path / 'profile'}"]
    dumped = subprocess.run([*common, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    shot = tmp_path / "report.png"
    shown = subprocess.run([*common, f"--screenshot={shot}", "--window-size=1600,2400", page.as_uri()],
                           capture_output=True, text=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 0, shown.stderr[-2000:]
    for stderr in (dumped.stderr, shown.stderr):
        said = [l for l in stderr.splitlines() if "Uncaught" in l or "CONSOLE" in l]
        assert not said, said
    dom = Dom(dumped.stdout)
    assert any(e["tag"] == "html" and e.get("data-ready") == "yes" for e in dom.elements), "the page's script did not run"
    zone = {h.name: z.name for z in topology.zones for h in z.hosts}
    per_cell = Counter((zone[c.client_host], zone[c.server_host], verdict) for verdict, _line, c in expected.values())
    cells = {(e["data-client-zone"], e["data-server-zone"]): e for e in dom.elements
             if e["tag"] == "td" and "cell" in e.get("class", "").split()}
    for (client_zone, server_zone, verdict), n in per_cell.items():
        cell = cells[(client_zone, server_zone)]
        assert cell["data-status"] == "fail" and cell.get(f"data-count-{verdict.lower()}") == str(n), cell
    findings = {e["data-key"]: e for e in dom.elements if e["tag"] == "tr" and "finding" in e.get("class", "").split()}
    assert set(findings) == set(expected)
    for key, (verdict, line, _c) in expected.items():
        assert findings[key]["data-verdict"] == verdict
        assert f"{RULES}:{line}: " in findings[key]["text"], (key, findings[key]["text"])


def test_each_findings_pcap_holds_the_probes_packets(audited):
    _proc, out, expected, topology = audited
    document = json.loads((out / "report.json").read_text())
    assert document["schema"] == 3 and document["pcap_dir"] == "pcap"
    entries = {v["key"]: v for v in document["verdicts"]}
    address = {h.name: h.address for h in topology.hosts}
    for key, (_verdict, _line, c) in expected.items():
        entry = entries[key]
        assert entry["pcap"], (key, entry["pcap_note"])
        read = subprocess.run(["tcpdump", "-nn", "-r", str(out / "pcap" / entry["pcap"])], capture_output=True,
                              text=True, timeout=60)
        assert read.returncode == 0, read.stderr
        probe = [l for l in read.stdout.splitlines()
                 if f"{address[c.client_host]}." in l and f"{address[c.server_host]}.{c.endpoint.port}:" in l]
        assert probe, (key, read.stdout[:1000])
        assert entry["pcap_packets"] == len(read.stdout.splitlines())


def test_the_default_audits_console_fits_one_screen(lab_host):
    proc = run_cli("audit", timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) <= SCREEN, proc.stdout
    assert lines[-1].startswith("PASS") and "\x1b" not in proc.stdout + proc.stderr
    assert footprint() == CLEAN
