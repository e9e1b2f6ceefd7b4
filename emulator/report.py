"""Rendering an audit for people: the console's views, the summary and the differential view.

Three views of one audit (`format_console`): the default (a zone x zone matrix, then only what is
wrong, each with the rule that decided it, then the totals), `all` (every check, the full table of
`format_report`) and `quiet` (the totals). Plain text: emulator.console colours it on a terminal.
Nothing here judges: verdicts come from emulator.evidence, what is wrong from emulator.report_model.
"""
from __future__ import annotations

from emulator import report_model
from emulator.audit import EXIT_BLOCKED, EXIT_EXPOSED, EXIT_LAB_FAULT, AuditReport, FlowVerdict
from emulator.evidence import PASSED, Verdict
from emulator.plan import CheckKind
from emulator.report_model import Zones

VIEWS = ("default", "all", "quiet")
MATRIX_CORNER = "from \\ to"
MATRIX_LEGEND = ("cells: ok N = N required flow checks pass; - = only exposure knocks, all closed; "
                 "same = no firewall between; . = nothing",
                 "findings: B blocked, X broken, E exposed, U unencrypted (the profile forbids it), L lab fault; "
                 "each with its count")
_COLUMNS = ("flow", "client", "server", "port", "protocol", "expected", "observed", "exchange", "verdict")
_SUMMARY_ORDER = (Verdict.ALLOWED, Verdict.UNENCRYPTED, Verdict.BLOCKED, Verdict.BROKEN, Verdict.SAME_SEGMENT,
                  Verdict.NO_SERVICE, Verdict.LAB_ERROR, Verdict.LOCAL, Verdict.NO_PEER, Verdict.NOT_EXERCISED)


def _short(text: str, width: int = 72) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _row(v: FlowVerdict) -> tuple[str, ...]:
    c = v.check
    notes = [v.detail] if v.detail and v.verdict not in PASSED else []
    notes += ["pre-installed certificate"] if v.certificate else []
    return (c.flow_id or "(exposure)", c.client_host or "-", c.server_host or "-", c.label,
            c.endpoint.protocol if c.endpoint else "-", v.expected, v.observed or "-", _short(v.exchange or "-"),
            str(v.verdict) + (f"  {'; '.join(notes)}" if notes else ""))


def _table(verdicts: list[FlowVerdict]) -> list[str]:
    rows = [_row(v) for v in verdicts]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(_COLUMNS)]
    widths[-1] = 0

    def line(cells):
        return "  ".join(str(cell).ljust(w) for cell, w in zip(cells, widths)).rstrip()

    out = [line(_COLUMNS)]
    for v, row in zip(verdicts, rows):
        out.append(line(row))
        if v.rule:
            out.append(f"    why: {v.rule}")
        if v.fix:
            out.append(f"    fix: {v.fix}")
    return out


def format_report(report: AuditReport, show_closed: bool = False) -> str:
    """Every check (closed exposure knocks only with `show_closed`), then the totals."""
    shown = [v for v in report.verdicts if show_closed or v.check.kind != CheckKind.EXPOSURE
             or v.verdict != Verdict.CLOSED]
    return "\n".join(_table(shown) + [""] + _totals(report))


def format_console(report: AuditReport, zones: Zones, view: str = "default") -> str:
    """The console's view of an audit (VIEWS): see the module docstring."""
    if view == "quiet":
        return "\n".join([_summary(report), verdict_line(report)])
    if view == "all":
        return "\n".join(_table(report.verdicts) + [""] + format_matrix(report, zones) + [""] + _totals(report))
    wrong = report_model.findings(report)
    out = _heading(report) + [""] + format_matrix(report, zones) + [""]
    if wrong:
        out.append(f"what is wrong ({len(wrong)} checks; every check: --all):")
        out += _table(wrong)
    else:
        out.append("nothing is wrong: every required flow passes, nothing is exposed, no lab fault "
                   "(every check: --all)")
    return "\n".join(out + [""] + _totals(report, heading=False))


def format_matrix(report: AuditReport, zones: Zones) -> list[str]:
    """The zone x zone matrix: clients' zones down, servers' zones across (see MATRIX_LEGEND)."""
    cells = report_model.matrix(report, zones)
    extra = sorted({z for pair, cell in cells.items() for z in pair if cell.status != "none"} - set(zones.names))
    names = [*zones.names, *extra]
    rows = [[MATRIX_CORNER, *names]] + [[a, *(cells.get((a, b), report_model.Cell()).code() for b in names)]
                                        for a in names]
    widths = [max(len(row[i]) for row in rows) for i in range(len(names) + 1)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows] + list(MATRIX_LEGEND)


def _heading(report: AuditReport) -> list[str]:
    out = [f"topology {report.topology}, rules: {report.rules}"]
    if report.profile:
        p = report.profile
        out.append(f"profile: SafeQ {p['version']}, security {p['security']}"
                   + (", choices " + ", ".join(f"{k}={'+'.join(v)}" for k, v in p["choices"].items()) if p["choices"] else ""))
    return out


def _summary(report: AuditReport) -> str:
    counts = report.counts
    exposure_total = sum(1 for v in report.verdicts if v.check.kind == CheckKind.EXPOSURE)
    return ("summary: " + ", ".join(f"{k} {counts[k]}" for k in _SUMMARY_ORDER if counts[k])
            + f"; exposure probes {exposure_total}: EXPOSED {counts[Verdict.EXPOSED]}, CLOSED {counts[Verdict.CLOSED]}")


def _totals(report: AuditReport, heading: bool = True) -> list[str]:
    out = (_heading(report) if heading else []) + [_summary(report)]
    pre_installed = sum(1 for v in report.verdicts if v.certificate == "pre-installed")
    if pre_installed:
        out.append(f"certificates: {pre_installed} TLS flow checks still present the pre-installed lab certificate "
                   "(the vendor says to replace them: --certs DIR with your CA and host certificates)")
    out.append(f"egress: {report.egress_drops} packets to addresses outside the lab were dropped")
    out.append("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in report.timings.items()))
    out.append(verdict_line(report))
    return out


def verdict_line(report: AuditReport) -> str:
    counts, status = report.counts, report.exit_status
    if status == 0:
        return f"PASS: every required flow passes and nothing is exposed ({report_model.status_words(status)})"
    parts = []
    if status & EXIT_BLOCKED:
        parts.append(f"{counts[Verdict.BLOCKED] + counts[Verdict.BROKEN]} required flow checks blocked or broken")
    if status & EXIT_EXPOSED:
        parts.append(f"{counts[Verdict.EXPOSED]} exposures")
    if status & EXIT_LAB_FAULT:
        parts.append(f"{counts[Verdict.NO_SERVICE] + counts[Verdict.LAB_ERROR]} lab faults (NO-SERVICE / LAB-ERROR: "
                     "not firewall findings)")
    return "FAIL: " + "; ".join(parts) + f" ({report_model.status_words(status)})"


def diff(before: AuditReport, after: AuditReport) -> list[tuple[FlowVerdict, FlowVerdict]]:
    """Checks whose verdict changed between two audits of the same plan."""
    old = {v.check.key: v for v in before.verdicts}
    return [(old[v.check.key], v) for v in after.verdicts
            if v.check.key in old and old[v.check.key].verdict != v.verdict]


def format_diff(before: AuditReport, after: AuditReport) -> str:
    changed = diff(before, after)
    out = [f"differential audit: {before.rules} -> {after.rules}: {len(changed)} checks changed"]
    for old, new in changed:
        c = new.check
        out.append(f"{c.flow_id or '(exposure)'}  {c.client_host} -> {c.server_host} {c.label}  "
                   f"{old.verdict} -> {new.verdict}")
        for side, v in (("before", old), ("after", new)):
            if v.rule:
                out.append(f"    {side}: {v.rule}")
        if new.fix:
            out.append(f"    fix: {new.fix}")
    out.append(f"after the change: {verdict_line(after)}")
    return "\n".join(out)
