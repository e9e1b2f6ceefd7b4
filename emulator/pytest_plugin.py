"""pytest plugin (entry point `safeq_lab`): a `safeq_lab` fixture and assertion helpers for your tests.

    from emulator.pytest_plugin import assert_flow_allowed, assert_no_exposures

    def test_terminals_reach_their_server(safeq_lab):          # a running lab, rules applied
        assert_flow_allowed(safeq_lab, flow="terminal-server-11", client="mfd-km", server="site1")
        assert_no_exposures(safeq_lab.audit(client="mfd-km"))

Options (command line, or the ini key in brackets): `--safeq-lab-topology` [safeq_lab_topology]
(default single-site), `--safeq-lab-rules` [safeq_lab_rules] ('generated', a rules file, or
NODE=FILE entries separated by commas; default: the topology's own rules files, else generated),
`--safeq-lab-scope` [safeq_lab_scope] (session, package, module, class or function; default
module: each test file gets one lab, torn down after its last test).

A failing helper names each check that failed (flow, client -> server, port), its verdict and what
was expected, and the rule that decided it (file:line: text, or the chain's policy). Nothing
heavy is imported until a lab is built: a test run that does not use the fixture pays nothing.
"""
from __future__ import annotations

import pytest

SCOPES = ("session", "package", "module", "class", "function")
DEFAULT_SCOPE = "module"
MAX_LISTED = 20  # failed checks named in one message; the rest are counted


def pytest_addoption(parser) -> None:
    group = parser.getgroup("safeq-lab", "safeq-lab (YSoft SafeQ 6 network emulator) fixture")
    group.addoption("--safeq-lab-topology", default=None, metavar="NAME|FILE",
                    help="topology of the safeq_lab fixture's lab (default single-site)")
    group.addoption("--safeq-lab-rules", default=None, metavar="RULES",
                    help="rules of the safeq_lab fixture: 'generated', a rules file, or NODE=FILE,NODE=FILE "
                         "(default: the topology's rules files, else generated)")
    group.addoption("--safeq-lab-scope", default=None, choices=SCOPES,
                    help=f"how long one safeq_lab lab lives (default {DEFAULT_SCOPE})")
    parser.addini("safeq_lab_topology", "topology of the safeq_lab fixture", default="single-site")
    parser.addini("safeq_lab_rules", "rules of the safeq_lab fixture (see --safeq-lab-rules)", default="")
    parser.addini("safeq_lab_scope", f"scope of the safeq_lab fixture ({', '.join(SCOPES)})", default=DEFAULT_SCOPE)


def _setting(config, name: str) -> str:
    return config.getoption(f"safeq_lab_{name}") or config.getini(f"safeq_lab_{name}")


def _scope(fixture_name: str, config) -> str:
    scope = _setting(config, "scope") or DEFAULT_SCOPE
    if scope not in SCOPES:
        raise pytest.UsageError(f"safeq_lab_scope = {scope!r}: use one of {', '.join(SCOPES)}")
    return scope


def rules_setting(text: str):
    """The --safeq-lab-rules text as SafeqLab's rules: None, 'generated', a file, or {node: file}."""
    text = (text or "").strip()
    if not text:
        return None
    if "=" not in text:
        return text
    entries = {}
    for entry in (e.strip() for e in text.split(",") if e.strip()):
        node, sep, value = entry.partition("=")
        if not sep or not node or not value:
            raise pytest.UsageError(f"--safeq-lab-rules {text!r}: give 'generated', FILE, or NODE=FILE,NODE=FILE")
        entries[node] = value
    return entries


@pytest.fixture(scope=_scope)
def safeq_lab(request):
    """A running emulator.api.SafeqLab (rules applied); torn down when its scope ends."""
    from emulator.api import SafeqLab

    config = request.config
    with SafeqLab(_setting(config, "topology") or "single-site", rules=rules_setting(_setting(config, "rules"))) as lab:
        yield lab


# -- assertion helpers ---------------------------------------------------------------------------------
def assert_flow_allowed(lab_or_report, flow: str | None = None, client: str | None = None,
                        server: str | None = None, port: int | None = None) -> None:
    """Every required check matching the filters passed the firewalls and its exchange completed.

    `lab_or_report`: a SafeqLab (the matching checks are run now) or an AuditReport (its verdicts
    are looked up). Fails when nothing matches, or naming each check that did not pass."""
    __tracebackhide__ = True
    from emulator.evidence import PASSED, Verdict

    filters = dict(flow=flow, client=client, server=server, port=port)
    if hasattr(lab_or_report, "check"):
        report = lab_or_report.check(**filters, kind="required")
    else:
        report = lab_or_report
    verdicts = _matching(report.verdicts, kind="required", **filters)
    wanted = _words(filters)
    if not verdicts:
        raise AssertionError(f"no required check matches {wanted} in the report ({len(report.verdicts)} verdicts)")
    bad = [v for v in verdicts if not (v.verdict in PASSED or (v.verdict == Verdict.SAME_SEGMENT and v.observed == "ok"))]
    if bad:
        raise AssertionError(f"{len(bad)} of {len(verdicts)} checks of {wanted} are not allowed "
                             f"(rules: {report.rules}):\n" + _describe(bad))


def assert_no_exposures(report) -> None:
    """No check of the report is EXPOSED (a port nothing needs, let through by every firewall)."""
    __tracebackhide__ = True
    from emulator.evidence import Verdict

    exposed = [v for v in report.verdicts if v.verdict == Verdict.EXPOSED]
    if exposed:
        raise AssertionError(f"{len(exposed)} exposures (rules: {report.rules}):\n" + _describe(exposed))


def assert_rules_equivalent(old, new, lab=None, **filters) -> None:
    """No check changes verdict between `old` and `new` (differential audit).

    Either two AuditReports of the same plan, or two rules specs ('generated', a file, ruleset
    text, {node: ...}) with `lab=` a running SafeqLab (audited under each; `filters` narrow the
    checks, as SafeqLab.audit takes them; the new rules stay applied)."""
    __tracebackhide__ = True
    from emulator.report import diff

    if lab is not None:
        old, new = lab.compare(old, new, **filters)
    elif not (hasattr(old, "verdicts") and hasattr(new, "verdicts")):
        raise TypeError("assert_rules_equivalent: give two AuditReports, or two rules specs and lab=")
    changed = diff(old, new)
    if changed:
        lines = []
        for before, after in changed[:MAX_LISTED]:
            lines.append(f"  {_name(after)}: {before.verdict} -> {after.verdict}")
            for side, v in (("before", before), ("after", after)):
                lines.append(f"      {side}: {_rule(v)}" + (f"; {v.detail}" if v.detail else ""))
            if after.fix:
                lines.append(f"      fix: {after.fix}")
        more = f"\n  ... and {len(changed) - MAX_LISTED} more" if len(changed) > MAX_LISTED else ""
        raise AssertionError(f"{len(changed)} checks change verdict from {old.rules} to {new.rules}:\n"
                             + "\n".join(lines) + more)


def _matching(verdicts, kind: str, flow=None, client=None, server=None, port=None) -> list:
    from emulator.api import select_checks

    wanted = {id(c) for c in select_checks([v.check for v in verdicts], flow=flow, client=client, server=server,
                                           port=port, kind=kind)}
    return [v for v in verdicts if id(v.check) in wanted]


def _words(filters: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in filters.items() if v is not None) or "every check"


def _name(v) -> str:
    c = v.check
    what = c.flow_id or str(c.kind)
    return f"{what} {c.client_host or '-'} -> {c.server_host or '-'} {c.label}"


def _rule(v) -> str:
    """The rule that decided, with the node holding it when the rule text does not say."""
    if not v.rule:
        return "none named"
    return v.rule if not v.node or v.rule.startswith(v.node) else f"{v.node}: {v.rule}"


def _describe(verdicts) -> str:
    lines = []
    for v in verdicts[:MAX_LISTED]:
        lines.append(f"  {_name(v)}: {v.verdict} (expected {v.expected}); rule: {_rule(v)}"
                     + (f"; {v.detail}" if v.detail else ""))
        if v.fix:
            lines.append(f"      fix: {v.fix}")
    if len(verdicts) > MAX_LISTED:
        lines.append(f"  ... and {len(verdicts) - MAX_LISTED} more")
    return "\n".join(lines)
