"""The audit: probe every planned check in a running lab and judge each one.

Verdicts are a pure function of the check and the probe outcome (`judge`), tested without a lab.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace

from emulator.catalog import Catalog
from emulator.pki import server_name
from emulator.plan import Check
from emulator.protocols.base import ProbeResult, ProbeTarget
from emulator.topology import Topology

PROBE_TIMEOUT = 5.0
PASSED = ("ALLOWED", "UNENCRYPTED")
REACHED = ("ok", "protocol_error")  # the port answered through the firewall, whatever it said

# Exit status bits of `safeq-lab audit`.
EXIT_BLOCKED = 1
EXIT_EXPOSED = 2


@dataclass(frozen=True)
class FlowVerdict:
    check: Check
    expected: str  # 'allow' | 'block' | '-'
    observed: str  # probe outcome, or 'local' / 'n/a'
    verdict: str  # ALLOWED | UNENCRYPTED | BLOCKED | BROKEN | EXPOSED | CLOSED | LOCAL | NO-PEER | NOT-EXERCISED
    exchange: str = ""
    detail: str = ""
    elapsed: float = 0.0
    certificate: str = ""  # 'pre-installed' when the server presented the lab's pre-installed certificate

    def to_dict(self) -> dict:
        data = asdict(self)
        ep = self.check.endpoint
        data["check"] = {"kind": self.check.kind, "flow": self.check.flow_id, "client": self.check.client_host,
                         "server": self.check.server_host, "endpoint": ep.label() if ep else None,
                         "variant": self.check.variant,
                         "protocol": ep.protocol if ep else None}
        return data


@dataclass
class AuditReport:
    topology: str
    rules: str
    verdicts: list[FlowVerdict]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def counts(self) -> Counter:
        return Counter(v.verdict for v in self.verdicts)

    @property
    def exit_status(self) -> int:
        counts = self.counts
        status = EXIT_BLOCKED if counts["BLOCKED"] or counts["BROKEN"] else 0
        return status | (EXIT_EXPOSED if counts["EXPOSED"] else 0)

    def to_dict(self) -> dict:
        return {"topology": self.topology, "rules": self.rules, "counts": dict(self.counts),
                "exit_status": self.exit_status, "timings": self.timings,
                "verdicts": [v.to_dict() for v in self.verdicts]}


def judge(check: Check, result: ProbeResult | None, catalog: Catalog, client_address: str | None = None) -> FlowVerdict:
    if check.kind == "local":
        return FlowVerdict(check, "-", "local", "LOCAL", detail=check.detail)
    if check.kind == "no-peer":
        return FlowVerdict(check, "-", "n/a", "NO-PEER", detail=check.detail)
    if check.kind == "not-exercisable":
        return FlowVerdict(check, "-", "n/a", "NOT-EXERCISED", detail=check.detail)
    common = dict(exchange=result.exchange, elapsed=result.elapsed)
    if check.kind == "exposure":
        if result.outcome in REACHED:
            return FlowVerdict(check, "block", result.outcome, "EXPOSED", detail=check.detail, **common)
        return FlowVerdict(check, "block", result.outcome, "CLOSED", detail=result.detail, **common)
    # a required flow
    if result.outcome == "ok":
        if client_address and result.peer_seen and result.peer_seen != client_address:
            return FlowVerdict(check, "allow", "ok", "BROKEN",
                               detail=f"server saw {result.peer_seen}, not {client_address} (NAT or proxy in the path)", **common)
        if check.endpoint.security == "plain" and _has_secured_alternative(catalog, check):
            return FlowVerdict(check, "allow", "ok", "UNENCRYPTED",
                               detail="passes in clear although the flow has a secured port", **common)
        return FlowVerdict(check, "allow", "ok", "ALLOWED", **common)
    if result.outcome == "protocol_error":
        return FlowVerdict(check, "allow", result.outcome, "BROKEN", detail=result.detail, **common)
    return FlowVerdict(check, "allow", result.outcome, "BLOCKED", detail=result.detail, **common)


def _has_secured_alternative(catalog: Catalog, check: Check) -> bool:
    flow = catalog.flow(check.flow_id)
    return any(ep.security != "plain" for ep in flow.endpoints)


# SafeQ's proprietary links carry job metadata of 40-60 kB per job (vendor document); print
# jobs are larger. Protocols not named here send their module's own realistic default.
PAYLOAD_SIZES = {"safeq": 48 * 1024, "lpr": 64 * 1024, "raw": 64 * 1024, "ipp": 64 * 1024}


def probe_targets(checks: list[Check], topology: Topology, timeout: float = PROBE_TIMEOUT,
                  ca_file: str = "") -> dict[str, list[ProbeTarget]]:
    by_host: dict[str, list[ProbeTarget]] = {h.name: [] for h in topology.hosts}
    for index, check in enumerate(checks):
        if not check.probed:
            continue
        ep = check.endpoint
        by_host[check.client_host].append(ProbeTarget(
            id=str(index), host=topology.host(check.server_host).address, transport=ep.transport,
            protocol=ep.protocol, port=ep.port, security=ep.security, timeout=timeout,
            size=PAYLOAD_SIZES.get(ep.protocol, 1024), flow=check.flow_id or "",
            server_name=server_name(check.server_host), ca_file=ca_file,
            options={"mode": check.variant} if check.variant else {}))
    return by_host


def run_audit(lab, checks: list[Check], rules_source: str, timeout: float = PROBE_TIMEOUT) -> AuditReport:
    topology, catalog = lab.topology, lab.catalog
    started = time.monotonic()
    results = lab.run_probes(probe_targets(checks, topology, timeout, lab.ca_file))
    probe_time = time.monotonic() - started
    verdicts = []
    pre_installed = lab.pre_installed_hosts
    for index, check in enumerate(checks):
        client = topology.host(check.client_host).address if check.client_host and check.probed else None
        verdict = judge(check, results.get(str(index)), catalog, client)
        if (check.kind == "required" and check.endpoint.security in ("tls", "starttls")
                and check.server_host in pre_installed):
            verdict = replace(verdict, certificate="pre-installed")
        verdicts.append(verdict)
    report = AuditReport(topology.name, rules_source, verdicts, dict(lab.timings))
    report.timings["probe"] = probe_time
    return report


# -- console output ---------------------------------------------------------------------------------
_COLUMNS = ("flow", "client", "server", "port", "protocol", "expected", "observed", "exchange", "verdict")


def _short(text: str, width: int = 72) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def format_report(report: AuditReport, show_closed: bool = False) -> str:
    rows = []
    for v in report.verdicts:
        if v.verdict == "CLOSED" and not show_closed:
            continue
        c = v.check
        notes = [v.detail] if v.detail and v.verdict not in PASSED else []
        notes += ["pre-installed certificate"] if v.certificate else []
        rows.append((c.flow_id or "(exposure)", c.client_host or "-", c.server_host or "-", c.label,
                     c.endpoint.protocol if c.endpoint else "-", v.expected, v.observed, _short(v.exchange or "-"),
                     v.verdict + (f"  {'; '.join(notes)}" if notes else "")))
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(_COLUMNS)]
    widths[-1] = 0
    def line(cells):
        return "  ".join(str(cell).ljust(w) for cell, w in zip(cells, widths)).rstrip()
    out = [line(_COLUMNS)] + [line(r) for r in rows]
    counts = report.counts
    exposure_total = sum(1 for v in report.verdicts if v.check.kind == "exposure")
    out.append("")
    out.append(f"topology {report.topology}, rules: {report.rules}")
    out.append("summary: " + ", ".join(f"{k} {counts[k]}" for k in
               ("ALLOWED", "UNENCRYPTED", "BLOCKED", "BROKEN", "LOCAL", "NO-PEER", "NOT-EXERCISED") if counts[k])
               + f"; exposure probes {exposure_total}: EXPOSED {counts['EXPOSED']}, CLOSED {counts['CLOSED']}")
    pre_installed = sum(1 for v in report.verdicts if v.certificate == "pre-installed")
    if pre_installed:
        out.append(f"certificates: {pre_installed} TLS flow checks still present the pre-installed lab certificate "
                   "(the vendor says to replace them: --certs DIR with your CA and host certificates)")
    out.append("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in report.timings.items()))
    verdict = ("PASS: every required flow passes and nothing is exposed" if report.exit_status == 0 else
               "FAIL: " + "; ".join(msg for bit, msg in ((EXIT_BLOCKED, f"{counts['BLOCKED'] + counts['BROKEN']} required flow checks blocked or broken"),
                                                        (EXIT_EXPOSED, f"{counts['EXPOSED']} exposures")) if report.exit_status & bit))
    out.append(verdict)
    return "\n".join(out)
