"""What every rendering of an audit shares: which zone each check runs between, which checks are
wrong, the zone x zone matrix, and a suggested fix in words.

Pure functions over an AuditReport (and the topology's zones): the console (emulator.report), the
report files (emulator.report_json, report_junit, report_html) and the per-finding captures
(emulator.pcap) all read the same answers from here, so they never disagree on what is wrong.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from emulator.audit import EXIT_BLOCKED, EXIT_EXPOSED, EXIT_LAB_FAULT, AuditReport, FlowVerdict
from emulator.evidence import LAB_FAULTS, PASSED, Verdict
from emulator.plan import CheckKind

NO_ZONE = "-"  # a check with no host (the line saying knocks could not be sent)

# Verdicts that are wrong whatever the profile says; UNENCRYPTED is wrong where the profile forbids clear text.
WRONG = (Verdict.BLOCKED, Verdict.BROKEN, Verdict.EXPOSED, *LAB_FAULTS)

# The order findings are listed in, and each verdict's one-letter code in the console's matrix.
FINDING_ORDER = (Verdict.BLOCKED, Verdict.BROKEN, Verdict.EXPOSED, Verdict.UNENCRYPTED, Verdict.NO_SERVICE,
                 Verdict.LAB_ERROR)
CODES = {Verdict.BLOCKED: "B", Verdict.BROKEN: "X", Verdict.EXPOSED: "E", Verdict.UNENCRYPTED: "U",
         Verdict.NO_SERVICE: "L", Verdict.LAB_ERROR: "L"}


@dataclass(frozen=True)
class Zones:
    """The topology's zones in its own order, and the zone of every host."""

    names: tuple[str, ...]
    of_host: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, topology) -> "Zones":
        return cls(tuple(z.name for z in topology.zones), {h.name: z.name for z in topology.zones for h in z.hosts})

    def pair(self, v: FlowVerdict) -> tuple[str, str]:
        """(client zone, server zone) of a check; a check without a client (not exercisable) runs from the server's."""
        c = v.check
        server = self.of_host.get(c.server_host or "", NO_ZONE)
        return self.of_host.get(c.client_host or "", server), server


def forbids_clear_text(report: AuditReport) -> bool:
    """The profile says plain variants of secured flows must not be used (security: secured-only)."""
    return (report.profile or {}).get("security") == "secured-only"


def is_wrong(v: FlowVerdict, forbid_clear_text: bool) -> bool:
    return v.verdict in WRONG or (forbid_clear_text and v.verdict == Verdict.UNENCRYPTED)


def findings(report: AuditReport) -> list[FlowVerdict]:
    """The checks that are wrong, in FINDING_ORDER then plan order."""
    forbid = forbids_clear_text(report)
    wrong = [v for v in report.verdicts if is_wrong(v, forbid)]
    return sorted(wrong, key=lambda v: FINDING_ORDER.index(v.verdict))


@dataclass
class Cell:
    """The checks between two zones, counted by verdict."""

    counts: Counter = field(default_factory=Counter)
    forbid_clear_text: bool = False

    @property
    def passed(self) -> int:
        return sum(self.counts[v] for v in PASSED if v != Verdict.UNENCRYPTED or not self.forbid_clear_text)

    def wrong(self) -> list[tuple[Verdict, int]]:
        return [(v, self.counts[v]) for v in FINDING_ORDER
                if self.counts[v] and (v != Verdict.UNENCRYPTED or self.forbid_clear_text)]

    @property
    def status(self) -> str:
        """fail (a firewall finding), lab (only lab faults), ok (required flows pass), same (no firewall
        between), closed (only exposure knocks, all closed), none (nothing between these zones)."""
        wrong = {v for v, _n in self.wrong()}
        if wrong - set(LAB_FAULTS):
            return "fail"
        if wrong:
            return "lab"
        if self.passed:
            return "ok"
        if self.counts[Verdict.SAME_SEGMENT]:
            return "same"
        return "closed" if self.counts[Verdict.CLOSED] else "none"

    def code(self) -> str:
        """Short text for a console cell: 'B2 E1' (see CODES), 'ok 12', 'same', '-' or '.'."""
        merged: Counter = Counter()
        for verdict, n in self.wrong():
            merged[CODES[verdict]] += n
        if merged:
            return " ".join(f"{code}{n}" for code, n in merged.items())
        return {"ok": f"ok {self.passed}", "same": "same", "closed": "-"}.get(self.status, ".")


def matrix(report: AuditReport, zones: Zones) -> dict[tuple[str, str], Cell]:
    """(client zone, server zone) -> Cell, for every pair of the topology's zones (and any zone a check names)."""
    forbid = forbids_clear_text(report)
    cells = {(a, b): Cell(forbid_clear_text=forbid) for a in zones.names for b in zones.names}
    for v in report.verdicts:
        pair = zones.pair(v)
        cell = cells.get(pair)
        if cell is None:  # not setdefault: that would build a Cell for each of tens of thousands of checks
            cell = cells[pair] = Cell(forbid_clear_text=forbid)
        cell.counts[v.verdict] += 1
    return cells


def suggestion(v: FlowVerdict) -> str:
    """What to do about a finding, in words (a blocked flow's exact rule is `v.fix`)."""
    if v.fix:
        return v.fix
    if v.verdict == Verdict.EXPOSED:
        where = f" ({v.rule})" if v.rule else ""
        return (f"narrow or remove the rule that lets it in{where}, so that only the catalog's flows to "
                f"{v.check.server_host} pass")
    if v.verdict == Verdict.BROKEN:
        return ("every firewall passed it: look for NAT or a proxy on the path (the server must see the client's "
                "own address), or at the server itself")
    if v.verdict == Verdict.UNENCRYPTED:
        return "use the flow's TLS variant and close the plain one (profile: secured-only)"
    if v.verdict == Verdict.BLOCKED:
        return "admit it on the node named (no traced rule to copy from: see the reason)"
    if v.verdict in LAB_FAULTS:
        return "a lab fault, not a firewall finding: rerun the audit; if it stays, report it with this detail"
    return ""


def check_name(v: FlowVerdict) -> str:
    """One line naming a check: 'flow-id client -> server 5021/tcp'."""
    c = v.check
    what = c.flow_id or ("exposure" if c.kind == CheckKind.EXPOSURE else str(c.kind))
    return f"{what} {c.client_host or '-'} -> {c.server_host or '-'} {c.label}"


def status_words(status: int) -> str:
    """The exit status of an audit in words (the bits of emulator.audit)."""
    if status == 0:
        return "exit status 0: all good"
    parts = [words for bit, words in ((EXIT_BLOCKED, "a required flow is blocked or broken"),
                                      (EXIT_EXPOSED, "something is exposed"),
                                      (EXIT_LAB_FAULT, "a lab fault")) if status & bit]
    return f"exit status {status}: " + ", ".join(parts)
