"""Running a scenario in a lab: each step as it happens, in words a trainer can read aloud.

The runner talks to the lab through what `emulator.lab.Lab` offers (run_probes, stop_daemon,
start_daemon, install_certificate, apply_rules, impair, clear_impairment, ca_file, documents) plus
one seam, `node_command(node, argv) -> stdout`, which runs a firewall command inside a node; tests
hand it a fake lab and a recording command.
"""
from __future__ import annotations

import shlex
import subprocess
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TextIO

from emulator import rules
from emulator.audit import probe_targets
from emulator.catalog import load_catalog
from emulator.errors import LabError
from emulator.impair import Impairment
from emulator.plan import Check, CheckKind, audit_plan
from emulator.protocols.base import ProbeResult
from emulator.rules import Ruleset
from emulator.scenario.schema import OUTCOME_GROUPS, Expect, Fault, Holds, Parallel, Scenario, Step, Table, Workflow


COMMAND_TIMEOUT = 30.0

OUTCOME_WORDS = {  # each names the outcome too, so a trainer can match it with the audit's words
    "ok": "it worked",
    "refused": "refused (nothing listens there, or a firewall rejects it)",
    "timeout": "no answer (timeout)",
    "silent": "connected, then no answer (silent)",
    "protocol_error": "an answer, but not the exchange it needs (protocol error)",
    "unreachable": "host or network unreachable",
    "error": "the probe itself failed (a lab error)",
}
CERTIFICATE_WORDS = {  # the certificate a `certificate` fault installs, by kind
    "expired": "a certificate from the lab CA that has expired",
    "pre-installed": "the device's pre-installed certificate (self-signed at the factory, not from the lab CA)",
    "valid": "a new, valid certificate from the lab CA",
}
EXPECTED_WORDS = {
    "ok": "to work",
    "refused": "to be refused",
    "timeout": "to get no answer (timeout)",
    "silent": "to connect and then get no answer",
    "protocol_error": "to get a wrong answer",
    "unreachable": "to find the host unreachable",
    "error": "to fail in the lab itself",
    "blocked": "to be blocked (no exchange: dropped, rejected or refused)",
    "failure": "to fail",
}

NodeCommand = Callable[[str, list], str]


@dataclass(frozen=True)
class WorkflowResult:
    """What a workflow's probes observed: the first failure decides (all ok: ok)."""

    outcome: str
    elapsed: float
    results: tuple[ProbeResult, ...]
    labels: tuple[str, ...]   # the endpoint of each result, e.g. '636/tcp ldap+tls'
    size: int = 0             # bytes of payload each probe carried

    @property
    def elapsed_ms(self) -> float:
        return self.elapsed * 1000

    @property
    def round_trip_ms(self) -> float | None:
        """The slowest endpoint's median round trip (option rounds); None when none was measured."""
        measured = [r.round_trip_ms for r in self.results if r.round_trip_ms is not None]
        return max(measured) if measured else None

    @property
    def mbit(self) -> float:
        """The payload's rate over the whole exchange, Mbit/s (10^6 bit/s, as tc and the scenario count)."""
        return self.size * 8 / 1e6 / self.elapsed if self.elapsed > 0 else 0.0


@dataclass(frozen=True)
class ExpectationResult:
    number: str
    wording: str
    held: bool
    observed: str


@dataclass
class ScenarioResult:
    name: str
    expectations: list[ExpectationResult] = field(default_factory=list)
    workflows: dict[str, WorkflowResult] = field(default_factory=dict)   # step id -> what it observed

    @property
    def passed(self) -> bool:
        return all(e.held for e in self.expectations)

    @property
    def exit_status(self) -> int:
        return 0 if self.passed else 1


def popen_command(lab) -> NodeCommand:
    """Run argv inside a lab node (no shell) and return its output; a failure is a LabError."""
    def run(node: str, argv: list) -> str:
        proc = lab.node(node).popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise LabError(f"{argv[0]} on {node} took more than {COMMAND_TIMEOUT:.0f}s") from None
        if proc.returncode != 0:
            first = next((line for line in err.splitlines() if line.strip()), f"exit status {proc.returncode}")
            raise LabError(f"`{shlex.join(argv)}` on {node} failed: {first}")
        return out
    return run


class Runner:
    def __init__(self, scenario: Scenario, lab, rulesets: dict[str, Ruleset], out: TextIO,
                 pause: Callable[[str], None] | None = None, node_command: NodeCommand | None = None):
        self.scenario, self.lab, self.rulesets, self.out = scenario, lab, dict(rulesets), out
        self.pause = pause
        self.node_command = node_command or popen_command(lab)
        self.report = ScenarioResult(scenario.name)
        self.results: dict[str, WorkflowResult] = self.report.workflows
        self._print_lock = threading.Lock()

    def say(self, text: str) -> None:
        with self._print_lock:
            print(text, file=self.out, flush=True)

    # -- the scenario ------------------------------------------------------------------------------
    def run(self) -> ScenarioResult:
        self.say(f"Scenario {self.scenario.name}: {self.scenario.description}")
        for step in self.scenario.steps:
            self._top(step)
        if self.scenario.repair:
            self.say("Repair:")
            for step in self.scenario.repair:
                self._top(step)
        self._summary()
        return self.report

    def _top(self, step: Step) -> None:
        if self.pause is not None:
            self.pause(f"Step {step.number}")
        if isinstance(step, Parallel):
            self._parallel(step)
        elif isinstance(step, Expect):
            self._expect(step)
        elif isinstance(step, Table):
            self._table(step)
        elif isinstance(step, Holds):
            self._holds(step)
        else:
            self.say(f"Step {step.number}: {self.describe(step)}")
            self._act(step, "  -> ")

    def _act(self, step: Workflow | Fault, lead: str) -> None:
        if isinstance(step, Workflow):
            result = self._workflow(step)
            for line in self._result_lines(result):
                self.say(lead + line)
        else:
            mechanism = self._fault(step)
            if mechanism:
                self.say(f"{lead}{mechanism}")

    def _parallel(self, group: Parallel) -> None:
        self.say(f"Step {group.number}: at the same time:")
        for step in group.steps:
            self.say(f"  {step.number}: {self.describe(step)}")
        pool = ThreadPoolExecutor(max_workers=len(group.steps))
        try:
            futures = [pool.submit(self._act, step, f"  {step.number} -> ") for step in group.steps]
            for future in futures:
                future.result()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)  # Ctrl-C: the lab's teardown ends the probes

    # -- words -----------------------------------------------------------------------------------
    def describe(self, step: Workflow | Fault) -> str:
        if isinstance(step, Workflow):
            which = ", ".join(_label(ep) for ep in step.endpoints)
            size = "" if step.size is None else f", {_size_words(step.size)}"
            carries = f", carrying {step.carries}" if step.carries else ""
            return f"{step.text} ({step.flow.id}, {step.client} -> {step.server}, {which}{size}{carries})"
        words = _fault_words(step)
        return f"{step.text}: {words}" if step.text else words

    def _result_lines(self, result: WorkflowResult) -> list[str]:
        lines = []
        for label, probe in zip(result.labels, result.results):
            prefix = f"{label}: " if len(result.results) > 1 else ""
            lines.append(prefix + _outcome_text(probe))
        return lines

    # -- workflows -------------------------------------------------------------------------------
    def _workflow(self, step: Workflow) -> WorkflowResult:
        topology = self.scenario.topology
        enforcers = tuple(topology.enforcers(step.client, step.server))
        checks = [Check(CheckKind.REQUIRED, step.flow.id, step.client, step.server, ep,
                        variant=step.mode if ep.protocol == "ftp" else "", enforcers=enforcers)
                  for ep in step.endpoints]
        planned = probe_targets(checks, topology)
        targets = {host: [replace(t, timeout=step.timeout, ca_file=self.lab.ca_file,
                                  options={**t.options, **step.options},
                                  size=t.size if step.size is None else step.size) for t in found]
                   for host, found in planned.items() if found}
        by_id = self.lab.run_probes(targets)
        ordered = [t.id for found in targets.values() for t in found]
        results = tuple(by_id.get(i) or ProbeResult(i, "error", 0.0, detail="no result came back") for i in ordered)
        failed = [r for r in results if r.outcome != "ok"]
        outcome = failed[0].outcome if failed else "ok"
        sizes = [t.size for found in targets.values() for t in found]
        result = WorkflowResult(outcome, max(r.elapsed for r in results), results,
                                tuple(_label(ep) for ep in step.endpoints), max(sizes, default=0))
        self.results[step.id] = result
        return result

    # -- faults ----------------------------------------------------------------------------------
    def _fault(self, step: Fault) -> str:
        """Make the fault happen; the mechanism in one line ('' when the words said it all)."""
        kind = step.kind
        if kind in ("delay", "loss", "cut", "bandwidth"):
            impairment = {"delay": lambda: Impairment(delay_ms=step.ms, jitter_ms=step.jitter_ms or None),
                          "loss": lambda: Impairment(loss=step.percent),
                          "cut": lambda: Impairment(loss=100.0),
                          "bandwidth": lambda: Impairment(bw=step.mbit)}[kind]()
            return str(self.lab.impair(step.link, impairment) or "")
        if kind == "clear":
            return str(self.lab.clear_impairment(step.link) or "")
        if kind == "stop":
            self.lab.stop_daemon(step.host)
            return ""
        if kind == "start":
            self.lab.start_daemon(step.host)
            return ""
        if kind == "certificate":
            return self.lab.install_certificate(step.host, step.certificate)
        if kind == "rule":
            argv = ["iptables", *shlex.split(step.rule)]
            self.node_command(step.node, argv)
            return f"on {step.node}: {shlex.join(argv)}"
        if kind == "block":
            commands = self._block_commands(step)
            for argv in commands:
                self.node_command(step.node, argv)
            return f"on {step.node}: " + "; ".join(shlex.join(argv) for argv in commands)
        if kind == "ftp-helper-off":
            nodes = [step.node] if step.node else [fw.name for fw in self.scenario.topology.firewalls]
            removed = sum(self._ftp_helper_off(node) for node in nodes)
            return f"{removed} conntrack helper rule{'s' if removed != 1 else ''} removed on {', '.join(nodes)}"
        if kind == "reset-rules":
            nodes = [step.node] if step.node else list(self.rulesets)
            self.lab.apply_rules({node: self.rulesets[node] for node in nodes if node in self.rulesets})
            return ""
        if kind == "generated-rules":
            nodes = [step.node] if step.node else [fw.name for fw in self.scenario.topology.firewalls]
            self.lab.apply_rules({node: generated_ruleset(self.scenario.topology, node) for node in nodes})
            return f"{', '.join(nodes)}: the ruleset generated from the catalog (stateful, default-drop)"
        raise LabError(f"{step.where}: fault {kind!r} is not implemented")  # the schema lists only known faults

    def _block_commands(self, step: Fault) -> list[list[str]]:
        topology = self.scenario.topology
        if topology.is_firewall(step.node):
            chain = "FORWARD"
        else:
            chain = "INPUT" if step.node == step.server else "OUTPUT"
        src, dst = topology.host(step.client).address, topology.host(step.server).address
        commands = []
        for ep in step.flow.endpoints:
            if ep.channel != "service" or ep.port is None or (step.security and ep.security != step.security):
                continue
            argv = ["iptables", "-I", chain, "-s", f"{src}/32", "-d", f"{dst}/32", "-p", ep.transport,
                    "--dport", str(ep.port), "-j", step.action.upper()]
            if step.action == "reject" and ep.transport == "tcp":
                argv += ["--reject-with", "tcp-reset"]
            if argv not in commands:
                commands.append(argv)
        return commands

    def _ftp_helper_off(self, node: str) -> int:
        """Remove the rules attaching the kernel's FTP conntrack helper on a node; how many."""
        ruleset = self.rulesets.get(node)
        if ruleset is not None and ruleset.format == "nft":
            listing = self.node_command(node, ["nft", "-a", "list", "ruleset"])
            doomed = _nft_helper_rules(listing)
            for family, table, chain, handle in doomed:
                self.node_command(node, ["nft", "delete", "rule", family, table, chain, "handle", handle])
            return len(doomed)
        saved = self.node_command(node, ["iptables-save", "-t", "raw"])
        doomed = [line for line in saved.splitlines() if line.startswith("-A ") and "--helper ftp" in line]
        for line in doomed:
            self.node_command(node, ["iptables", "-t", "raw", "-D", *shlex.split(line)[1:]])
        return len(doomed)

    # -- expectations ----------------------------------------------------------------------------
    def _expect(self, step: Expect) -> None:
        workflow = self.scenario.workflows()[step.target]
        wording = f"step {workflow.number} ({workflow.text}) {_expected_clause(step)}"
        self.say(f"Step {step.number}: expect {wording}")
        result = self.results.get(step.target)
        if result is None:  # the schema orders ids; a failed parallel step may still leave none
            held, observed = False, "the step did not run"
        else:
            held, observed = judge(step, result)
        self._record(step.number, f"{workflow.text}: {_expected_clause(step)}", held, observed, step.says)

    def _record(self, number: str, wording: str, held: bool, observed: str, says: str = "") -> None:
        verdict = "holds" if held else "DOES NOT HOLD"
        self.say(f"  -> {verdict}: {observed}" + (f". {says}" if says else ""))
        self.report.expectations.append(ExpectationResult(number, wording, held, observed))

    # -- documents passed along -------------------------------------------------------------------
    def _holds(self, step: Holds) -> None:
        """The document at `step.host` (of its kind) has the sha256 it had where it was created."""
        wording = f"{step.host} holds {step.name}" + (f" ({step.kind})" if step.kind else "")
        if step.above_kb is not None or step.below_kb is not None:
            wording += " with " + _bounds_words(step.above_kb, step.below_kb, "kB") + " of job metadata"
        wording += f", the bytes {step.origin} started with"
        self.say(f"Step {step.number}: expect {wording}")
        try:
            held, observed = judge_holds(step, self.lab.documents(step.host, step.name),
                                         self.lab.documents(step.origin, step.name))
        except LabError as exc:   # a stopped daemon cannot say what it holds
            held, observed = False, str(exc)
        self._record(step.number, wording, held, observed, step.says)

    # -- tables ----------------------------------------------------------------------------------
    def _table(self, step: Table) -> None:
        """Delivery time of each listed workflow against size * 8 / rate; with `within`, judged too."""
        workflows = self.scenario.workflows()
        self.say(f"Step {step.number}: delivery times at {step.mbit:g} Mbit/s (predicted: size x 8 / rate)")
        rows = [(workflows[i], self.results.get(i)) for i in step.targets]
        self.say(f"  {'step':<16} {'size':>10} {'seconds':>9} {'Mbit/s':>8} {'predicted s':>12}  outcome")
        for workflow, result in rows:
            predicted = _predicted_seconds(workflow.size, step.mbit)
            if result is None:
                self.say(f"  {workflow.id:<16} {_size_words(workflow.size):>10} {'-':>9} {'-':>8} {predicted:>12.2f}  did not run")
                continue
            self.say(f"  {workflow.id:<16} {_size_words(workflow.size):>10} {result.elapsed:>9.2f} "
                     f"{result.mbit:>8.2f} {predicted:>12.2f}  {result.outcome}")
        if step.says:
            self.say(f"  {step.says}")
        if step.within is None:
            return
        for workflow, result in rows:
            predicted = _predicted_seconds(workflow.size, step.mbit)
            wording = (f"{workflow.text}: {_size_words(workflow.size)} delivered in {predicted:.2f} s "
                       f"+/- {step.within:g} %")
            if result is None or result.outcome != "ok":
                held, observed = False, "the step did not run" if result is None else OUTCOME_WORDS[result.outcome]
            else:
                off = (result.elapsed - predicted) / predicted * 100
                held = abs(off) <= step.within
                observed = f"{result.elapsed:.2f} s, {off:+.0f} % ({result.mbit:.2f} Mbit/s)"
            self._record(step.number, wording, held, observed)
        done = [(w.size, r.elapsed) for w, r in rows if r is not None and r.outcome == "ok"]
        ordered = [elapsed for _size, elapsed in sorted(done)]
        grows = len(done) == len(rows) and all(a < b for a, b in zip(ordered, ordered[1:]))
        self._record(step.number, "the delivery time grows with the job's size", grows,
                     ", ".join(f"{_size_words(size)}: {elapsed:.2f} s" for size, elapsed in sorted(done)) or "nothing ran")

    def _summary(self) -> None:
        held = sum(e.held for e in self.report.expectations)
        total = len(self.report.expectations)
        self.say("")
        self.say(f"Scenario {self.scenario.name}: {held} of {total} expectation{'s' if total != 1 else ''} hold"
                 + ("" if held == total else " - FAILED"))
        for e in self.report.expectations:
            self.say(f"  {'PASS' if e.held else 'FAIL'}  step {e.number:<5} {e.wording}  [{e.observed}]")


def generated_ruleset(topology, node: str) -> Ruleset:
    """The least-privilege ruleset `safeq-lab rules generate` writes for a firewall node of the topology."""
    checks = audit_plan(load_catalog(), topology, exposures=False)
    return rules.generate(topology, checks, node=node)


def judge(step: Expect, result: WorkflowResult) -> tuple[bool, str]:
    """Whether an expectation holds for a workflow's result, and what was observed, in words."""
    held = True
    if step.outcome:
        held = result.outcome in OUTCOME_GROUPS[step.outcome]
    if step.above_ms is not None:
        held = held and result.elapsed_ms > step.above_ms
    if step.below_ms is not None:
        held = held and result.elapsed_ms < step.below_ms
    round_trip = result.round_trip_ms
    if step.rtt_above_ms is not None:
        held = held and round_trip is not None and round_trip > step.rtt_above_ms
    if step.rtt_below_ms is not None:
        held = held and round_trip is not None and round_trip < step.rtt_below_ms
    if result.outcome == "ok":
        observed = f"it worked in {result.elapsed_ms:.0f} ms"
    else:
        observed = f"{OUTCOME_WORDS[result.outcome]} after {result.elapsed:.1f} s"
    if round_trip is not None:
        observed += f"; round trip {round_trip:.1f} ms"
    elif step.rtt_above_ms is not None or step.rtt_below_ms is not None:
        observed += "; no round trip measured"
    if step.detail:
        said = next((text for r in result.results for text in (r.detail, r.exchange)
                     if step.detail.lower() in text.lower()), None)
        held = held and said is not None
        observed += f"; {said}" if said is not None else f"; no probe said {step.detail!r}"
    return held, observed


def judge_holds(step: Holds, there: list, origin: list) -> tuple[bool, str]:
    """Whether `there` (documents the host holds by that name) has the one `origin` created, in words."""
    created = next((d for d in reversed(origin) if d.kind == "created"), None)
    found = [d for d in there if d.kind != "created" and (not step.kind or d.kind == step.kind)]
    if created is None:
        return False, f"{step.origin} never created {step.name} (its first workflow did not run there)"
    if not found:
        kinds = f" as {step.kind}" if step.kind else ""
        return False, f"{step.host} holds no {step.name}{kinds}"
    doc = found[-1]
    seen = (f"{step.host} holds {doc.name} ({doc.kind}, {doc.size} B, sha256 {doc.sha256[:12]}, by {doc.via or '?'}"
            f"{' from ' + doc.peer if doc.peer else ''}")
    seen += f", {doc.metadata_bytes / 1000:.1f} kB of metadata)" if doc.metadata_bytes else ")"
    held = doc.sha256 == created.sha256
    seen += ("; the same sha256 as " if held else f"; sha256 differs from {created.sha256[:12]}, ") + \
        f"the {created.size} B {step.origin} created"
    kb = doc.metadata_bytes / 1000
    if step.above_kb is not None:
        held = held and kb > step.above_kb
    if step.below_kb is not None:
        held = held and kb < step.below_kb
    return held, seen


def _bounds_words(above: float | None, below: float | None, unit: str) -> str:
    if above is not None and below is not None:
        return f"{above:g}-{below:g} {unit}"
    return f"over {above:g} {unit}" if above is not None else f"under {below:g} {unit}"


def _expected_clause(step: Expect) -> str:
    parts = [EXPECTED_WORDS[step.outcome]] if step.outcome else []
    if step.above_ms is not None:
        parts.append(f"taking more than {step.above_ms:g} ms")
    if step.below_ms is not None:
        parts.append(f"taking less than {step.below_ms:g} ms")
    if step.rtt_above_ms is not None:
        parts.append(f"a round trip over {step.rtt_above_ms:g} ms")
    if step.rtt_below_ms is not None:
        parts.append(f"a round trip under {step.rtt_below_ms:g} ms")
    if step.detail:
        parts.append(f"saying {step.detail!r}")
    return ", ".join(parts)


def _predicted_seconds(size: int, mbit: float) -> float:
    return size * 8 / (mbit * 1e6)


def _size_words(size: int) -> str:
    """A size as the scenario would write it: MB and KB are powers of ten, MiB and KiB of two."""
    for unit in ("MiB", "MB", "KiB", "KB"):
        factor = {"MiB": 1024 ** 2, "MB": 1000 ** 2, "KiB": 1024, "KB": 1000}[unit]
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} B"


def _outcome_text(probe: ProbeResult) -> str:
    if probe.outcome == "ok":
        return f"it worked in {probe.elapsed:.2f} s" + (f": {probe.exchange}" if probe.exchange else "")
    why = OUTCOME_WORDS.get(probe.outcome, probe.outcome)
    seen = f"; {probe.exchange}" if probe.exchange else ""
    detail = f"; {probe.detail}" if probe.detail else ""
    return f"failed after {probe.elapsed:.1f} s: {why}{seen}{detail}"


def _label(ep) -> str:
    return f"{ep.label()} {ep.protocol}" + ("" if ep.security == "plain" else f"+{ep.security}")


def _fault_words(step: Fault) -> str:
    if step.kind == "delay":
        jitter = f" (jitter {step.jitter_ms:g} ms)" if step.jitter_ms else ""
        return f"the {step.link} link gets {step.ms:g} ms more round-trip time{jitter}"
    if step.kind == "loss":
        return f"the {step.link} link loses {step.percent:g} % of its packets"
    if step.kind == "cut":
        return f"the {step.link} link is cut: every packet is lost"
    if step.kind == "bandwidth":
        return f"the {step.link} link is throttled to {step.mbit:g} Mbit/s"
    if step.kind == "clear":
        return f"the {step.link} link is back to normal"
    if step.kind == "stop":
        return f"the role daemon on {step.host} stops: its services close their ports"
    if step.kind == "start":
        return f"the role daemon on {step.host} starts again: its services open their ports"
    if step.kind == "certificate":
        return (f"{step.host}'s TLS services (all of them, without a restart) now present "
                f"{CERTIFICATE_WORDS[step.certificate]}")
    if step.kind == "rule":
        return f"firewall {step.node} gets a new rule"
    if step.kind == "block":
        which = f"{step.security} " if step.security else ""
        verb = "drops" if step.action == "drop" else "rejects"
        return f"firewall {step.node} {verb} {which}{step.flow.id} from {step.client} to {step.server}"
    if step.kind == "ftp-helper-off":
        return (f"firewall {step.node or 'every firewall node'} stops following FTP data channels "
                "(the FTP conntrack helper is removed)")
    if step.kind == "reset-rules":
        return f"{'firewall ' + step.node if step.node else 'every firewall'} gets the scenario's rules back"
    if step.kind == "generated-rules":
        return f"{'firewall ' + step.node if step.node else 'every firewall'} gets the generated rules"
    return step.kind


def _nft_helper_rules(listing: str) -> list[tuple[str, str, str, str]]:
    """(family, table, chain, handle) of every rule in `nft -a list ruleset` that sets a ct helper."""
    found, table, chain = [], None, None
    for line in listing.splitlines():
        words = line.split()
        if len(words) >= 3 and words[0] == "table":
            table, chain = (words[1], words[2]), None
        elif len(words) >= 2 and words[0] == "chain":
            chain = words[1]
        elif "ct helper set" in line and "# handle" in line and table and chain:
            found.append((table[0], table[1], chain, line.rsplit("# handle", 1)[1].split()[0]))
    return found
