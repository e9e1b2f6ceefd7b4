"""report.json: the audit as one JSON document, the source the JUnit and HTML reports are rendered from.

Schema 3 (`"schema": 3`; a reader checks it and refuses a number it does not know). An audit:

    {"schema": 3, "kind": "audit", "generator": "safeq-lab", "generated": "2025-01-31T12:00:00+00:00",
     "topology": "single-site", "rules": "fw: site.rules",
     "profile": {"version": "MU38", "security": "mixed", "choices": {"database": ["pgsql"]}},
     "zones": ["servers", "mgmt", ...],                  # the topology's zones, in its order
     "counts": {"ALLOWED": 700, "CLOSED": 69208, ...},   # every check, by verdict
     "exit_status": 0, "exit_status_words": "exit status 0: all good",
     "timings": {"build": 3.1, "start": 0.7, "probe": 9.8, ...},   # seconds
     "egress_drops": 0,                                  # packets to outside the lab that were dropped
     "closed_listed": false,                             # are CLOSED exposure knocks in "verdicts" (--all)?
     "matrix": [{"client_zone": "users", "server_zone": "servers", "status": "fail",
                 "counts": {"ALLOWED": 12, "BLOCKED": 1}}, ...],   # status: fail|lab|ok|same|closed|none
     "findings": [3, 17],                                # ids of the checks that are wrong
     "pcap_dir": "pcap",                                 # with --pcap: where the per-finding pcaps are
     "verdicts": [{"id": 3, "key": "required:mfd-02:site1>mfd-km:50003/tcp",
                   "check": {"kind": "required", "flow": "mfd-02", "client": "site1", "server": "mfd-km",
                             "endpoint": "50003/tcp", "protocol": "http", "variant": "", "path": ["fw"]},
                   "client_zone": "servers", "server_zone": "devices",
                   "expected": "allow", "verdict": "BLOCKED", "wrong": true,
                   "observed": "timeout", "exchange": "...", "detail": "fw dropped the request (timeout)",
                   "elapsed": 0.5, "certificate": "", "node": "fw", "direction": "request",
                   "rule": "fw site.rules:3: no rule matched: chain FORWARD policy DROP",
                   "fix": "-I FORWARD ...", "suggestion": "-I FORWARD ...",
                   "pcap": "0001-BLOCKED-site1-mfd-km-50003-tcp.pcap", "pcap_packets": 4, "pcap_note": ""}]}

`wrong` is what the console lists by default: BLOCKED, BROKEN, EXPOSED, NO-SERVICE, LAB-ERROR, and
UNENCRYPTED where the profile is `secured-only`. `suggestion` is `fix` when the audit computed the
rule that would admit a blocked flow, else what to do in words. `pcap` is null without `--pcap`.
A differential audit (`--against`):

    {"schema": 3, "kind": "differential", "generator": ..., "generated": ..., "exit_status": ...,
     "before": {an audit, as above}, "after": {an audit, as above},
     "changed": [{"key": ..., "check": {...}, "client_zone": ..., "server_zone": ...,
                  "before": {"id": 3, "verdict": "ALLOWED", "rule": "...", "detail": "..."},
                  "after": {"id": 3, "verdict": "BLOCKED", "rule": "...", "detail": "...", "fix": "..."}}]}

Schema 2 (`--json FILE`, AuditReport.to_dict) is unchanged; schema 3 holds its keys and adds to them.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone

from emulator import report_model
from emulator.audit import AuditReport, FlowVerdict
from emulator.evidence import Verdict
from emulator.report import diff
from emulator.report_model import Zones

SCHEMA = 3
GENERATOR = "safeq-lab"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def audit_document(report: AuditReport, zones: Zones, pcaps: dict | None = None, include_closed: bool = False,
                   pcap_dir: str = "pcap") -> dict:
    """The document of one audit; `pcaps`: check key -> emulator.pcap.FindingPcap."""
    forbid = report_model.forbids_clear_text(report)
    pcaps = pcaps or {}
    listed = [(i, v) for i, v in enumerate(report.verdicts) if include_closed or v.verdict != Verdict.CLOSED]
    cells = report_model.matrix(report, zones)
    document = {
        "schema": SCHEMA, "kind": "audit", "generator": GENERATOR, "generated": _now(),
        "topology": report.topology, "rules": report.rules, "profile": report.profile,
        "zones": list(zones.names), "counts": dict(report.counts), "exit_status": report.exit_status,
        "exit_status_words": report_model.status_words(report.exit_status),
        "timings": {k: round(v, 3) for k, v in report.timings.items()}, "egress_drops": report.egress_drops,
        "closed_listed": include_closed,
        "matrix": [{"client_zone": a, "server_zone": b, "status": cell.status, "counts": dict(cell.counts)}
                   for (a, b), cell in cells.items()],
        "findings": [i for i, v in enumerate(report.verdicts) if report_model.is_wrong(v, forbid)],
        "verdicts": [verdict_entry(i, v, zones, forbid, pcaps.get(v.check.key)) for i, v in listed],
    }
    if pcaps:
        document["pcap_dir"] = pcap_dir
    return document


def verdict_entry(index: int, v: FlowVerdict, zones: Zones, forbid_clear_text: bool, pcap=None) -> dict:
    client_zone, server_zone = zones.pair(v)
    entry = {"id": index, "key": v.check.key, **v.to_dict(), "client_zone": client_zone, "server_zone": server_zone,
             "direction": v.direction, "wrong": report_model.is_wrong(v, forbid_clear_text),
             "suggestion": report_model.suggestion(v) if report_model.is_wrong(v, forbid_clear_text) else "",
             "pcap": None, "pcap_packets": None, "pcap_note": ""}
    if pcap is not None:
        entry.update(pcap=pcap.name or None, pcap_packets=pcap.packets if pcap.name else None, pcap_note=pcap.note)
    return entry


def differential_document(before: AuditReport, after: AuditReport, zones: Zones, pcaps_before: dict | None = None,
                          pcaps_after: dict | None = None, include_closed: bool = False) -> dict:
    ids_before = {v.check.key: i for i, v in enumerate(before.verdicts)}
    ids_after = {v.check.key: i for i, v in enumerate(after.verdicts)}
    changed = []
    for old, new in diff(before, after):
        client_zone, server_zone = zones.pair(new)
        changed.append({
            "key": new.check.key, "check": new.to_dict()["check"], "client_zone": client_zone, "server_zone": server_zone,
            "before": {"id": ids_before[old.check.key], "verdict": str(old.verdict), "rule": old.rule,
                       "detail": old.detail},
            "after": {"id": ids_after[new.check.key], "verdict": str(new.verdict), "rule": new.rule,
                      "detail": new.detail, "fix": new.fix}})
    return {"schema": SCHEMA, "kind": "differential", "generator": GENERATOR, "generated": _now(),
            "exit_status": after.exit_status, "exit_status_words": report_model.status_words(after.exit_status),
            "before": audit_document(before, zones, pcaps_before, include_closed),
            "after": audit_document(after, zones, pcaps_after, include_closed),
            "changed": changed}


def render(document: dict) -> str:
    return json.dumps(document, indent=1) + "\n"


def final_audit(document: dict) -> dict:
    """The audit whose verdicts set the exit status: the audit itself, or a differential's `after`."""
    if document.get("schema") != SCHEMA:
        raise ValueError(f"report schema {document.get('schema')!r}: this reader knows schema {SCHEMA}")
    return document["after"] if document["kind"] == "differential" else document
