"""The workflow stories (scenarios/*-workflow.yaml) run green in a real lab, and the data really
went along: the job at the MFD and the scan in the mailbox have the sha256 of what the user and
the MFD created, the Spooler Controller's and Management's accounting came with 40-60 kB of
metadata. A blocked hop makes the delivery expectation fail. The stories change nothing in the lab,
so they share one single-site lab with the generated rules; the blocked variant runs last."""
from __future__ import annotations

import io
import time

import pytest

from emulator.catalog import load_catalog
from emulator.lab import Lab, preflight
from emulator.scenario import Runner, load_scenario
from emulator.scenario.command import scenario_rulesets
from emulator.scenario.schema import SCENARIOS_DIR, Expect, Holds
from tests.lab.helpers import footprint

pytestmark = pytest.mark.lab
STORY_SECONDS = 15.0   # a handful of hops with documents of 1-2 MB


@pytest.fixture(scope="module")
def shared_lab(lab_host):
    catalog = load_catalog()
    first = load_scenario("print-release-workflow", catalog)
    rulesets = scenario_rulesets(first)
    preflight()
    with Lab(first.topology, catalog) as lab:
        lab.apply_rules(rulesets)
        yield lab, rulesets, catalog
    assert not any(footprint().values()), footprint()


def run_story(lab, rulesets, scenario) -> tuple:
    out = io.StringIO()
    started = time.monotonic()
    result = Runner(scenario, lab, rulesets, out).run()
    return result, out.getvalue(), time.monotonic() - started


def one(lab, host: str, name: str, kind: str):
    found = [d for d in lab.documents(host, name) if d.kind == kind]
    assert len(found) == 1, (host, name, kind, found)
    return found[0]


@pytest.mark.parametrize("name", ["print-release-workflow", "scan-to-mail-workflow"])
def test_workflow_story_is_green(shared_lab, name):
    lab, rulesets, catalog = shared_lab
    scenario = load_scenario(name, catalog)
    result, text, took = run_story(lab, rulesets, scenario)
    expectations = sum(1 for step in scenario.steps if isinstance(step, (Expect, Holds)))
    assert result.passed, text
    assert f"Scenario {name}: {expectations} of {expectations} expectations hold\n" in text, text
    assert took < STORY_SECONDS, f"{name} took {took:.1f}s:\n{text}"


def test_the_job_arrived_with_its_bytes_and_its_metadata(shared_lab):
    lab, _rulesets, _catalog = shared_lab
    created = one(lab, "pc1", "report-1", "created")
    assert created.size == 2_000_000
    for host, kind, via in (("site1", "print-job", "lpr"), ("mfd-km", "print-job", "raw"),
                            ("site2", "accounting", "framed"), ("mgmt1", "accounting", "framed")):
        doc = one(lab, host, "report-1", kind)
        assert (doc.sha256, doc.size, doc.via) == (created.sha256, created.size, via), (host, doc)
    for host in ("site2", "mgmt1"):
        assert 40_000 <= one(lab, host, "report-1", "accounting").metadata_bytes < 60_000
    assert one(lab, "site1", "report-1", "print-job").owner == "alice"


def test_the_scan_arrived_in_the_mailbox_and_at_its_reader(shared_lab):
    lab, _rulesets, _catalog = shared_lab
    created = one(lab, "mfd-km", "scan-1", "created")
    assert created.size == 1_000_000
    for host, kind, via in (("site1", "scan", "ftp"), ("wps", "scan", "webdav"), ("mail", "mail", "smtp"),
                            ("site1", "mail", "imap")):
        doc = one(lab, host, "scan-1", kind)
        assert (doc.sha256, doc.size, doc.via) == (created.sha256, created.size, via), (host, doc)


def test_a_blocked_release_leaves_the_mfd_without_the_job(shared_lab, tmp_path):
    """The same story with the release hop dropped by the firewall (and a job of its own): every
    hop before it still holds, the release and the MFD's copy do not."""
    lab, rulesets, catalog = shared_lab
    text = (SCENARIOS_DIR / "print-release-workflow.yaml").read_text().replace("report-1", "report-2")
    release = "  - {id: release,"
    assert text.count(release) == 1
    text = text.replace(release, '  - {fault: block, flow: mfd-23, from: site1, to: mfd-km, do: "The firewall drops print '
                                 'delivery to the MFD"}\n' + release)
    path = tmp_path / "print-release-blocked.yaml"
    path.write_text(text.replace("name: print-release-workflow", "name: print-release-blocked"))
    scenario = load_scenario(path, catalog)
    try:
        result, out, _took = run_story(lab, rulesets, scenario)
    finally:
        lab.apply_rules(rulesets)   # the block leaves with the scenario
    failed = [e for e in result.expectations if not e.held]
    assert [e.wording for e in failed] == [
        "alice releases the job: FlexiSpooler site1 sends it to the Konica Minolta MFD over RAW (JetDirect): to work",
        "mfd-km holds report-2 (print-job), the bytes pc1 started with"], out
    assert "mfd-km holds no report-2 as print-job" in out
    assert not [d for d in lab.documents("mfd-km", "report-2") if d.kind == "print-job"]
    assert one(lab, "site2", "report-2", "accounting").sha256 == one(lab, "pc1", "report-2", "created").sha256
