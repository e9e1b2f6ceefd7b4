r"""The Python API: a lab from a topology, your rules, then audits, single checks or scenarios.

    from emulator import SafeqLab

    DROP_ALL = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"

    with SafeqLab("single-site", rules="generated") as lab:  # built here, torn down on leaving the block
        report = lab.check(flow="terminal-server-11", client="mfd-km", server="site1")
        for v in report.verdicts:  # FlowVerdict: .check .verdict .observed .detail .rule .fix
            print(v.check.label, v.check.endpoint.protocol, v.verdict)
        assert report.exit_status == 0  # every check passed (the bits of `safeq-lab audit`'s exit status)
        lab.apply_rules(DROP_ALL)  # a rules file's path, ruleset text, "generated", or {node: ...}
        blocked = lab.check(flow="terminal-server-11", client="mfd-km", server="site1")
        print(dict(blocked.counts))  # {'BLOCKED': 8}
        print(blocked.verdicts[0].rule)  # the rule that decided: line 3 of the text, the FORWARD policy
        print(blocked.verdicts[0].fix)  # the rule that would admit it, in the ruleset's own format

Results are the audit's own objects: `AuditReport` (`.verdicts`, `.counts`, `.exit_status`,
`.to_dict()`) holding `FlowVerdict`s (`.check`, `.verdict`, `.observed`, `.detail`, `.rule`,
`.fix`). Errors a user can fix are `LabError`s with a one-line message.

Importing this module is cheap: Mininet, Twisted and the lab itself are imported when a lab is
built (the zygote forks daemons from a process that must not hold a reactor; see emulator.zygote).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from emulator.audit import AuditReport
    from emulator.plan import Check
    from emulator.rules import Ruleset
    from emulator.scenario.runner import ScenarioResult

GENERATED = "generated"
DEFAULT_TOPOLOGY = "single-site"
RulesSpec = Any  # "generated" | a path | ruleset text | Ruleset | {node: any of these} | None (the topology's own)


class SafeqLab:
    """A running lab with rules applied: `with SafeqLab(topology, rules=...) as lab:`.

    `topology`: a name in topologies/ or the path of a topology file. `rules`: "generated" (the
    least-privilege rules for every firewall node), the path of an iptables-save or nft file, the
    text of one, a `Ruleset`, or a mapping node -> any of these (a host named there gets a host
    firewall from that file); None: the topology's own rules files, else generated. `timeout`:
    seconds a probe may take. `certs`: a directory with your CA and host certificates.
    """

    def __init__(self, topology: str | Path = DEFAULT_TOPOLOGY, rules: RulesSpec = None, *,
                 timeout: float = 5.0, certs: str | None = None, impairable: tuple[str, ...] = ()):
        from emulator.catalog import load_catalog
        from emulator.plan import audit_plan
        from emulator.topology import load_topology

        self.catalog = load_catalog()
        loaded = load_topology(str(topology))
        host_files = _host_rule_files(loaded, rules)
        self.topology = loaded.with_host_rules(host_files) if host_files else loaded
        self.checks: list[Check] = audit_plan(self.catalog, self.topology)
        self.timeout = timeout
        self._rules, self._certs, self._impairable = rules, certs, tuple(impairable)
        self.rulesets: dict[str, Ruleset] = {}
        self.lab = None  # emulator.lab.Lab while the lab runs

    # -- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> "SafeqLab":
        from emulator import pki
        from emulator.lab import Lab

        rulesets = self.resolve_rules(self._rules)  # a bad rules file stops us before anything is built
        if self._certs:
            pki.load_pki_dir(self._certs, [h.name for h in self.topology.hosts])
        lab = Lab(self.topology, self.catalog, certs_dir=self._certs, impairable=self._impairable)
        lab.__enter__()
        self.lab = lab
        try:
            self._apply(rulesets)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Tear the lab down (also on exit from the `with` block); a second call does nothing."""
        lab, self.lab = self.lab, None
        if lab is not None:
            lab.close()

    @property
    def running(self) -> bool:
        return self.lab is not None

    # -- rules ------------------------------------------------------------------------------------
    def resolve_rules(self, spec: RulesSpec) -> dict[str, Ruleset]:
        """node -> Ruleset for a rules spec (see the class); validated, nothing applied."""
        return resolve_rules(self.topology, self.checks, spec)

    def apply_rules(self, rules: RulesSpec) -> dict[str, Ruleset]:
        """Replace the rules of the nodes the spec names (a bare file or text: the first firewall node)."""
        rulesets = self.resolve_rules(rules)
        self._apply(rulesets)
        return rulesets

    def _apply(self, rulesets: dict[str, Ruleset]) -> None:
        self._running().apply_rules(rulesets)
        self.rulesets.update(rulesets)

    # -- audits -----------------------------------------------------------------------------------
    def select(self, flow: str | None = None, client: str | None = None, server: str | None = None,
               port: int | None = None, kind: str | None = None) -> list[Check]:
        """The planned checks matching every filter given (kind: 'required' or 'exposure')."""
        return select_checks(self.checks, flow=flow, client=client, server=server, port=port, kind=kind)

    def audit(self, timeout: float | None = None, **filters) -> AuditReport:
        """Probe and judge every planned check (or those `select(**filters)` picks) -> AuditReport."""
        checks = self.select(**filters) if any(v is not None for v in filters.values()) else self.checks
        return self._run(checks, timeout)

    def check(self, flow: str | None = None, client: str | None = None, server: str | None = None,
              port: int | None = None, kind: str | None = None, timeout: float | None = None) -> AuditReport:
        """Only the checks matching the filters (a flow id, client and server host, a port), probed and
        judged like in a full audit -> AuditReport; at least one check must match."""
        wanted = dict(flow=flow, client=client, server=server, port=port, kind=kind)
        if all(v is None for v in wanted.values()):
            from emulator.errors import LabError
            raise LabError("check() needs a filter: flow=, client=, server=, port= or kind= (audit() runs every check)")
        checks = self.select(**wanted)
        if not checks:
            from emulator.errors import LabError
            raise LabError(f"no planned check of topology {self.topology.name} matches "
                           + ", ".join(f"{k}={v!r}" for k, v in wanted.items() if v is not None)
                           + " (safeq-lab catalog lists flow ids; safeq-lab topology lists hosts)")
        return self._run(checks, timeout)

    def compare(self, old: RulesSpec, new: RulesSpec, timeout: float | None = None,
                **filters) -> tuple[AuditReport, AuditReport]:
        """Differential audit: the same checks under `old`, then under `new` rules (left applied)."""
        self.apply_rules(old)
        before = self.audit(timeout, **filters)
        self.apply_rules(new)
        return before, self.audit(timeout, **filters)

    def _run(self, checks: list[Check], timeout: float | None) -> AuditReport:
        from emulator.audit import run_audit

        lab = self._running()
        source = "; ".join(f"{node}: {r.source}" for node, r in lab.rulesets.items())
        return run_audit(lab, checks, source, timeout=timeout or self.timeout, rulesets=dict(lab.rulesets))

    def _running(self):
        if self.lab is None:
            from emulator.errors import LabError
            raise LabError("the lab is not running: use it inside `with SafeqLab(...) as lab:`")
        return self.lab


# -- rules specs -------------------------------------------------------------------------------------
def resolve_rules(topology, checks: list[Check], spec: RulesSpec) -> dict[str, Ruleset]:
    """node -> Ruleset: see SafeqLab. None: the topology's rules files, else the generated rules."""
    from emulator import rules

    if spec is None:
        chosen = {node: _one(topology, checks, node, str(path)) for node, path in topology.rules_files.items()}
        for fw in topology.firewalls:
            chosen.setdefault(fw.name, rules.generate(topology, checks, node=fw.name))
        return chosen
    if isinstance(spec, str) and spec == GENERATED:
        return {fw.name: rules.generate(topology, checks, node=fw.name) for fw in topology.firewalls}
    if not isinstance(spec, Mapping):
        spec = {topology.firewall: spec}
    unknown = sorted(set(spec) - set(topology.filtering_nodes) - {h.name for h in topology.hosts})
    if unknown:
        from emulator.errors import LabError
        raise LabError(f"rules name {', '.join(unknown)}: not a firewall node or host of topology {topology.name} "
                       f"(nodes: {', '.join(topology.filtering_nodes)})")
    return {node: _one(topology, checks, node, value) for node, value in spec.items()}


def _one(topology, checks: list[Check], node: str, value) -> Ruleset:
    from emulator import rules
    from emulator.errors import LabError

    owner = f"{'firewall node' if topology.is_firewall(node) else 'host'} {node} of topology {topology.name}"
    if isinstance(value, rules.Ruleset):
        return value
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str):
        raise LabError(f"rules for {node}: give 'generated', a file path, ruleset text or a Ruleset, "
                       f"not {type(value).__name__}")
    if value == GENERATED:
        if not topology.is_firewall(node):
            raise LabError(f"rules for host {node}: only firewall nodes have generated rules; give a file")
        return rules.generate(topology, checks, node=node)
    if "\n" in value.strip():  # ruleset text, not a file name
        fmt = rules.detect_format(value)
        if fmt == "unknown":
            raise LabError(f"rules text for {node} is neither an iptables-save ruleset (*filter ... COMMIT) "
                           "nor an nft ruleset (table ...)")
        ruleset = rules.Ruleset(fmt, value if value.endswith("\n") else value + "\n", f"<{node} rules text>")
        rules.validate(ruleset, rules.node_interfaces(topology, node), owner)
        return ruleset
    return rules.load_rules_file(value, rules.node_interfaces(topology, node), owner)


def _host_rule_files(topology, spec: RulesSpec) -> dict[str, str]:
    """Hosts the spec gives a firewall file to (they change the plan: the host filters its traffic)."""
    if not isinstance(spec, Mapping):
        return {}
    firewalls = {fw.name for fw in topology.firewalls}
    hosts = {h.name for h in topology.hosts}
    return {node: str(value) for node, value in spec.items()
            if node in hosts and node not in firewalls and isinstance(value, (str, Path))}


# -- selecting checks ------------------------------------------------------------------------------
def select_checks(checks: list[Check], flow: str | None = None, client: str | None = None,
                  server: str | None = None, port: int | None = None, kind: str | None = None) -> list[Check]:
    """Checks matching every filter given; `port` matches an endpoint's port or range."""
    def matches(c: Check) -> bool:
        ep = c.endpoint
        return ((flow is None or c.flow_id == flow) and (client is None or c.client_host == client)
                and (server is None or c.server_host == server) and (kind is None or str(c.kind) == kind)
                and (port is None or (ep is not None and (ep.port == port or (
                    ep.port_range is not None and ep.port_range[0] <= port <= ep.port_range[1])))))
    return [c for c in checks if c.probed and matches(c)]


# -- scenarios ---------------------------------------------------------------------------------------
def run_scenario(name_or_path: str, out: TextIO | None = None) -> ScenarioResult:
    """Build a scenario's own lab (its topology, rules and impairable links), run its steps, tear
    down -> ScenarioResult (`.passed`, `.expectations` with `.wording`, `.held`, `.observed`).
    The story it tells goes to `out` (default: nowhere)."""
    import io

    from emulator.catalog import load_catalog
    from emulator.lab import Lab
    from emulator.scenario.command import lab_options, scenario_rulesets
    from emulator.scenario.runner import Runner
    from emulator.scenario.schema import load_scenario

    catalog = load_catalog()
    scenario = load_scenario(name_or_path, catalog)
    rulesets = scenario_rulesets(scenario)
    out = out if out is not None else io.StringIO()
    with Lab(scenario.topology, catalog, **lab_options(scenario)) as lab:
        lab.apply_rules(rulesets)
        return Runner(scenario, lab, rulesets, out).run()
