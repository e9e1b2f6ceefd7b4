"""`--report DIR`: report.json, junit.xml and report.html (and with `--pcap`, DIR/pcap/*.pcap).

The directory is created if it is missing (its parent must exist) and proven writable before the
lab is built, so that a whole audit is never lost to a typo. The three files are replaced on
every run; `--pcap` first removes the *.pcap files a previous run left in DIR/pcap.
"""
from __future__ import annotations

from pathlib import Path

from emulator import report_html, report_json, report_junit
from emulator.audit import AuditReport
from emulator.errors import LabError
from emulator.report_model import Zones

REPORT_JSON, JUNIT_XML, REPORT_HTML = "report.json", "junit.xml", "report.html"
PCAP_DIR = "pcap"


def prepare(path_text: str, pcap: bool = False) -> Path:
    """The report directory, created and proven writable now (LabError naming the fix otherwise)."""
    directory = Path(path_text)
    if directory.exists() and not directory.is_dir():
        raise LabError(f"--report {directory} is a file; give a directory (it is created if missing)")
    if not directory.parent.is_dir():
        raise LabError(f"--report {directory}: directory {directory.parent} does not exist; create it or give another path")
    try:
        directory.mkdir(exist_ok=True)
        probe = directory / ".safeq-lab-write-test"
        probe.write_text("")
        probe.unlink()
        if pcap:
            (directory / PCAP_DIR).mkdir(exist_ok=True)
            for old in (directory / PCAP_DIR).glob("*.pcap"):
                old.unlink()
    except OSError as exc:
        raise LabError(f"--report {directory} cannot be written ({exc.strerror or exc.__class__.__name__}); "
                       "give a writable directory") from None
    return directory


def write(directory: Path, document: dict, final: AuditReport, zones: Zones, pcaps: dict | None = None) -> list[Path]:
    """Write the three files; `final` is the audit whose verdicts become junit.xml (a differential's second)."""
    texts = {REPORT_JSON: report_json.render(document),
             JUNIT_XML: report_junit.render(final, zones, pcaps, PCAP_DIR),
             REPORT_HTML: report_html.render(document)}
    written = []
    for name, text in texts.items():
        path = directory / name
        try:
            path.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise LabError(f"--report {path} could not be written ({exc.strerror or exc.__class__.__name__}); "
                           "give a writable directory") from None
        written.append(path)
    return written
