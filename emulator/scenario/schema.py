"""Scenario files: reading them with line numbers, validating every step, the typed steps.

A scenario is checked whole against its topology and the catalog before anything is built:
hosts, firewall nodes, flows, links and step ids. Every problem is one LabError line naming the
file, the line and the key: `scenarios/x.yaml:12: steps[3].fault: unknown fault 'dely'; use one of ...`.
Pure data; nothing here touches Mininet.
"""
from __future__ import annotations

import ipaddress
import math
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from emulator.catalog import Catalog, Endpoint, Flow, load_catalog
from emulator.errors import LabError
from emulator.pki import CERTIFICATE_KINDS
from emulator.plan import excluded_by_profile
from emulator.protocols.framed import MAX_ROUNDS
from emulator.protocols.jobstore import KINDS as DOCUMENT_KINDS
from emulator.topology import Topology, load_topology

SCENARIOS_DIR = Path(__file__).resolve().parent.parent.parent / "scenarios"
MAX_SCENARIO_BYTES = 256 * 1024
MAX_DEPTH = 16
MAX_STEPS = 200
DEFAULT_TIMEOUT = 3.0  # seconds a workflow's probe may take: a dropped packet costs this once
MAX_TIMEOUT = 60.0
MAX_SIZE = 64 * 1024 * 1024  # largest payload a workflow may ask for (a print job of 64 MiB)
SIZE_UNITS = {"B": 1, "KB": 1000, "MB": 1000 ** 2, "KiB": 1024, "MiB": 1024 ** 2}
SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(" + "|".join(SIZE_UNITS) + r")$")
NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
STEP_ID = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
PLACEHOLDER = re.compile(r"\{([a-z0-9][a-z0-9-]*)\}")
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")

# what an expectation may ask of a workflow's outcome (probe outcomes, plus two groups)
OUTCOME_GROUPS = {
    "ok": frozenset({"ok"}),
    "refused": frozenset({"refused"}),
    "timeout": frozenset({"timeout"}),
    "silent": frozenset({"silent"}),
    "protocol_error": frozenset({"protocol_error"}),
    "unreachable": frozenset({"unreachable"}),
    "error": frozenset({"error"}),
    # no exchange took place: dropped (timeout), rejected or nothing listening (refused, unreachable)
    "blocked": frozenset({"timeout", "refused", "unreachable"}),
    "failure": frozenset({"refused", "timeout", "silent", "protocol_error", "unreachable", "error"}),
}
LINK_FAULTS = ("delay", "loss", "cut", "bandwidth", "clear")
FAULTS = LINK_FAULTS + ("stop", "start", "rule", "block", "ftp-helper-off", "reset-rules", "generated-rules",
                         "certificate")
RULE_ACTIONS = ("drop", "reject")
# catalog protocols whose probes pass a named document on (option carries; emulator/protocols/jobstore.py):
# lpd, raw, framed (safeq: job metadata), http (soap: the job list; webdav), ftp, smtp, imap
CARRYING_PROTOCOLS = ("lpr", "ipp", "raw", "safeq", "soap", "webdav", "ftp", "smtp", "imap")
HELD_KINDS = tuple(k for k in DOCUMENT_KINDS if k != "created")
FTP_MODES = ("passive", "active")


@dataclass(frozen=True)
class Workflow:
    """A catalog flow run from one host to another: its probes, one per endpoint chosen."""

    where: str            # 'file:line: steps[2]' for messages
    number: str           # as printed: '3', or '4.2' inside a parallel group
    id: str
    text: str             # what happens, in words ('do:')
    flow: Flow
    client: str
    server: str
    endpoints: tuple[Endpoint, ...]
    options: dict = field(default_factory=dict, hash=False)
    mode: str = ""        # FTP: passive | active
    timeout: float = DEFAULT_TIMEOUT
    size: int | None = None   # bytes of payload (a print job's size); None: the audit's default for the protocol
    carries: str = ""         # the document it passes on (or creates, on the first hop): jobstore


@dataclass(frozen=True)
class Fault:
    where: str
    number: str
    kind: str             # one of FAULTS
    text: str = ""        # optional words ('do:') printed before the mechanism
    link: str = ""
    host: str = ""
    node: str = ""
    rule: str = ""        # `rule`: iptables arguments with {host}/{zone} replaced by addresses
    flow: Flow | None = None   # `block`
    client: str = ""
    server: str = ""
    security: str = ""
    action: str = "drop"
    ms: float = 0.0
    jitter_ms: float = 0.0
    percent: float = 0.0
    mbit: float = 0.0
    certificate: str = ""   # `certificate`: which one the host's TLS ports present (pki.CERTIFICATE_KINDS)


@dataclass(frozen=True)
class Expect:
    where: str
    number: str
    target: str           # the id of an earlier workflow
    outcome: str = ""     # a key of OUTCOME_GROUPS ('' = not asked)
    above_ms: float | None = None
    below_ms: float | None = None
    says: str = ""        # words for the trainer
    rtt_above_ms: float | None = None   # round_trip_ms: the median round trip measured on the connection
    rtt_below_ms: float | None = None
    detail: str = ""      # words some probe's detail or exchange must contain (case-insensitive), e.g. 'expired'


@dataclass(frozen=True)
class Holds:
    """A host holds a document an earlier workflow carried, with the bytes it started with."""

    where: str
    number: str
    name: str             # the document (a workflow's carries:)
    host: str             # where it should be (at:)
    origin: str           # the host that created it: the first workflow carrying it ran from there
    kind: str = ""        # in: one of HELD_KINDS ('' = whatever it arrived as)
    above_kb: float | None = None   # metadata_kb: the job metadata that came with it (accounting)
    below_kb: float | None = None
    says: str = ""


@dataclass(frozen=True)
class Table:
    """Earlier workflows of known sizes told as a table of delivery times against a link's rate."""

    where: str
    number: str
    targets: tuple[str, ...]   # ids of earlier workflows with a size
    mbit: float                # the rate the times are predicted from: size * 8 / rate
    within: float | None = None   # percent: each time within this of its prediction, and growing with size
    says: str = ""


@dataclass(frozen=True)
class Parallel:
    where: str
    number: str
    steps: tuple  # Workflow | Fault


Step = Workflow | Fault | Expect | Parallel | Table | Holds


@dataclass(frozen=True)
class Scenario:
    path: Path
    name: str
    description: str
    topology: Topology
    rules: dict[str, str | Path]      # firewall node -> 'generated' or a rules file
    impairable: tuple[str, ...]
    steps: tuple[Step, ...]
    repair: tuple[Step, ...] = ()

    @property
    def needs_impairments(self) -> bool:
        return bool(self.impairable)

    def workflows(self) -> dict[str, Workflow]:
        found = {}
        for step in self.steps + self.repair:
            for item in (step.steps if isinstance(step, Parallel) else (step,)):
                if isinstance(item, Workflow):
                    found[item.id] = item
        return found


# -- reading: YAML with the line of every value ------------------------------------------------
class _Document:
    """A YAML file as plain data plus the line where each value (by key path) starts."""

    def __init__(self, path: Path, data: Any, lines: dict[tuple, int]):
        self.path, self.data, self.lines = path, data, lines

    def line(self, at: tuple) -> int:
        while at and at not in self.lines:
            at = at[:-1]
        return self.lines.get(at, 1)

    def fail(self, at: tuple, message: str) -> LabError:
        return LabError(f"{self.path}:{self.line(at)}: {_key_text(at) or 'file'}: {message}")


def _key_text(at: tuple) -> str:
    text = ""
    for part in at:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


class _NoAnchors(yaml.SafeLoader):
    """A scenario needs no anchors or aliases (a kilobyte of aliases expands to gigabytes), nor deep nesting."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if getattr(event, "anchor", None) is not None:
            sign = "*" if isinstance(event, yaml.AliasEvent) else "&"
            raise _Refused(f"{sign}{event.anchor}: anchors and aliases are not allowed in a scenario; write the "
                           "value out", event.start_mark)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _Refused(f"nested more than {MAX_DEPTH} levels deep; a scenario needs about five", event.start_mark)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _Refused(yaml.MarkedYAMLError):
    def __init__(self, problem: str, mark):
        super().__init__(problem=problem, problem_mark=mark)


def read_document(path: Path) -> _Document:
    try:
        size = path.stat().st_size
        if size > MAX_SCENARIO_BYTES:
            raise LabError(f"{path}:1: file: {size} bytes; a scenario is at most {MAX_SCENARIO_BYTES // 1024} KiB")
        raw = path.read_bytes()
    except OSError as exc:
        raise LabError(f"{path}: cannot be read ({exc.strerror or exc.__class__.__name__}); check the path "
                       f"(scenarios: {', '.join(available_scenarios()) or 'none'})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise LabError(f"{path}:{line}: file: byte 0x{raw[exc.start]:02x} is not UTF-8; save the file as UTF-8") from None
    loader = _NoAnchors(text)
    try:
        node = loader.get_single_node()
        lines: dict[tuple, int] = {}
        data = None if node is None else _plain(loader, node, (), lines)
    except _Refused as exc:
        raise LabError(f"{path}:{exc.problem_mark.line + 1}: file: {exc.problem}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = " ".join(str(exc.problem or exc.context or "").split())
        raise LabError(f"{path}:{mark.line + 1 if mark else 1}: file: not valid YAML ({problem}); fix the YAML "
                       "at that line") from None
    except yaml.YAMLError as exc:
        raise LabError(f"{path}:1: file: not valid YAML ({' '.join(str(exc).split())[:200]})") from None
    finally:
        loader.dispose()
    if data is None:
        raise LabError(f"{path}:1: file: the file is empty; copy a scenario from scenarios/ to start")
    return _Document(path, data, lines)


def _plain(loader, node, at: tuple, lines: dict):
    """The node as plain data, recording each value's line; duplicate keys and control characters refused."""
    lines[at] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        result = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True) if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str):
                raise _Refused("keys are words; this key is not", key_node.start_mark)
            if key in result:
                raise _Refused(f"key {key!r} is given twice in one mapping (first on line {lines[at + (key,)]}); "
                               "merge them", key_node.start_mark)
            result[key] = None
            lines[at + (key,)] = key_node.start_mark.line + 1
            result[key] = _plain(loader, value_node, at + (key,), lines)
            lines[at + (key,)] = key_node.start_mark.line + 1  # the key's line names the key
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_plain(loader, item, at + (i,), lines) for i, item in enumerate(node.value)]
    value = loader.construct_object(node, deep=True)
    if isinstance(value, str) and _CONTROL.search(value):
        raise _Refused("a control character in a value would reach the terminal; remove it", node.start_mark)
    return value


# -- finding scenario files --------------------------------------------------------------------
def available_scenarios() -> list[str]:
    return sorted(p.stem for p in SCENARIOS_DIR.glob("*.yaml"))


def resolve_scenario_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise LabError(f"scenario file {path} does not exist; give a name in scenarios/ "
                           f"({', '.join(available_scenarios())}) or the path of a .yaml file")
        return path
    candidate = SCENARIOS_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        raise LabError(f"unknown scenario {name_or_path!r}: use one of {', '.join(available_scenarios())} "
                       "or a path to a .yaml file")
    return candidate


# -- validation --------------------------------------------------------------------------------
TOP_KEYS = ("name", "description", "topology", "rules", "impairable", "timeout", "steps", "repair")
WORKFLOW_KEYS = ("id", "do", "flow", "from", "to", "options", "security", "protocol", "mode", "timeout", "size",
                 "carries")
HOLDS_KEYS = ("holds", "at", "in", "metadata_kb", "says")
EXPECT_KEYS = ("expect", "outcome", "elapsed_ms", "round_trip_ms", "detail", "says")
TABLE_KEYS = ("table", "mbit", "within", "says")
FAULT_KEYS = {
    "delay": ("link", "ms", "jitter_ms"),
    "loss": ("link", "percent"),
    "cut": ("link",),
    "bandwidth": ("link", "mbit"),
    "clear": ("link",),
    "stop": ("host",),
    "rule": ("node", "rule"),
    "block": ("node", "flow", "from", "to", "security", "action"),
    "ftp-helper-off": ("node",),
    "reset-rules": ("node",),
    "generated-rules": ("node",),
    "certificate": ("host", "kind"),
    "start": ("host",),
}
FAULT_REQUIRED = {"delay": ("link", "ms"), "loss": ("link", "percent"), "cut": ("link",),
                  "bandwidth": ("link", "mbit"), "clear": ("link",), "stop": ("host",), "rule": ("node", "rule"),
                  "block": ("flow", "from", "to"), "ftp-helper-off": ("node",), "reset-rules": (),
                  "generated-rules": (), "certificate": ("host", "kind"),
                  "start": ("host",)}


class _Validator:
    def __init__(self, doc: _Document, catalog: Catalog):
        self.doc, self.catalog = doc, catalog
        self.topology: Topology | None = None
        self.impairable: tuple[str, ...] = ()
        self.timeout = DEFAULT_TIMEOUT
        self.ids: set[str] = set()
        self.workflow_ids: set[str] = set()
        self.workflows: dict[str, Workflow] = {}
        self.origins: dict[str, str] = {}   # document carried -> the host its first workflow ran from

    def fail(self, at: tuple, message: str) -> LabError:
        return self.doc.fail(at, message)

    # -- small typed readers
    def mapping(self, value, at: tuple, allowed, required=()) -> dict:
        if not isinstance(value, dict):
            raise self.fail(at, f"expected a mapping (key: value lines), got {_kind(value)}")
        for key in value:
            if key not in allowed:
                raise self.fail(at + (key,), f"unknown key {key!r}; allowed here: {', '.join(allowed)}")
        for key in required:
            if key not in value:
                raise self.fail(at, f"missing key {key!r}")
        return value

    def text(self, value, at: tuple, one_line: bool = True) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(at, f"expected words in quotes, got {_kind(value)}")
        if one_line and "\n" in value.strip():
            raise self.fail(at, "expected one line of text")
        return value.strip()

    def number(self, value, at: tuple, low: float, high: float, what: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(at, f"expected a number ({what}), got {_kind(value)}")
        if not low <= value <= high:
            raise self.fail(at, f"{value:g} is out of range: give {what} from {low:g} to {high:g}")
        return float(value)

    def host(self, value, at: tuple) -> str:
        names = [h.name for h in self.topology.hosts]
        if value not in names:
            raise self.fail(at, f"no host {value!r} in topology {self.topology.name}; hosts: {', '.join(names)}")
        return value

    def rule_node(self, value, at: tuple) -> str:
        nodes = self.topology.filtering_nodes
        if value not in nodes:
            raise self.fail(at, f"{value!r} holds no ruleset in topology {self.topology.name}; "
                                f"use one of {', '.join(nodes)}")
        return value

    def flow(self, value, at: tuple) -> Flow:
        if not isinstance(value, str):
            raise self.fail(at, f"expected a catalog flow id such as terminal-server-45, got {_kind(value)}")
        try:
            flow = self.catalog.flow(value)
        except LabError:
            near = [f.id for f in self.catalog.flows if f.id.rsplit("-", 1)[0] == value.rsplit("-", 1)[0]][:6]
            hint = f" (flows like it: {', '.join(near)})" if near else " (list them with `safeq-lab catalog`)"
            raise self.fail(at, f"no catalog flow {value!r}{hint}") from None
        if not flow.exercisable:
            raise self.fail(at, f"flow {value} cannot be exercised in the lab: {flow.why_not}")
        return flow

    # -- the file
    def scenario(self) -> Scenario:
        raw = self.mapping(self.doc.data, (), TOP_KEYS, ("name", "description", "topology", "steps"))
        name = raw["name"]
        if not isinstance(name, str) or not NAME.match(name):
            raise self.fail(("name",), f"{name!r}: lowercase letters, digits and '-' only (a descriptive "
                                       "hyphenated name, like passive-ftp-blocked)")
        description = self.text(raw["description"], ("description",))
        self.topology = self._topology(raw["topology"])
        rules = self._rules(raw.get("rules", "generated"))
        self.impairable = self._impairable(raw.get("impairable", []))
        if "timeout" in raw:
            self.timeout = self.number(raw["timeout"], ("timeout",), 0.1, MAX_TIMEOUT, "seconds")
        steps = self._steps(raw["steps"], ("steps",), 1)
        repair = self._steps(raw["repair"], ("repair",), len(steps) + 1) if "repair" in raw else ()
        return Scenario(self.doc.path, name, description, self.topology, rules, self.impairable, steps, repair)

    def _topology(self, value) -> Topology:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(("topology",), f"expected a topology name or path, got {_kind(value)}")
        beside = self.doc.path.parent / value
        ref = str(beside) if value.endswith((".yaml", ".yml")) and beside.is_file() else value
        try:
            return load_topology(ref, known_roles=set(self.catalog.roles))
        except LabError as exc:
            raise self.fail(("topology",), str(exc)) from None

    def _rules(self, value) -> dict[str, str | Path]:
        firewalls = [fw.name for fw in self.topology.firewalls]
        if value == "generated":
            return {fw: "generated" for fw in firewalls}
        if not isinstance(value, dict):
            raise self.fail(("rules",), "expected 'generated' or a mapping firewall node -> rules file (or "
                                        f"'generated'); firewall nodes: {', '.join(firewalls)}")
        chosen: dict[str, str | Path] = {fw: "generated" for fw in firewalls}
        for node, source in value.items():
            self.rule_node(node, ("rules", node))
            if source == "generated":
                if not self.topology.is_firewall(node):
                    raise self.fail(("rules", node), f"rules are generated for firewall nodes only; give {node} a file")
                continue
            if not isinstance(source, str):
                raise self.fail(("rules", node), f"expected 'generated' or a rules file, got {_kind(source)}")
            path = self.doc.path.parent / source
            if not path.is_file():
                raise self.fail(("rules", node), f"rules file {path} does not exist (a path relative to the scenario)")
            chosen[node] = path
        return chosen

    def _impairable(self, value) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.fail(("impairable",), f"expected a list of link names (a zone's link is named after the zone, "
                                             f"a firewall node's WAN link wan-<node>), got {_kind(value)}")
        if len(set(value)) != len(value):
            raise self.fail(("impairable",), "a link is named twice")
        known = self.topology.link_names
        for i, link in enumerate(value):
            if link not in known:
                raise self.fail(("impairable", i), f"no link {link!r} in topology {self.topology.name}; "
                                                   f"links: {', '.join(known)}")
        return tuple(value)

    def _steps(self, value, at: tuple, first: int) -> tuple[Step, ...]:
        if not isinstance(value, list) or not value:
            raise self.fail(at, f"expected a list of steps (lines starting with '- '), got {_kind(value)}")
        if len(value) > MAX_STEPS:
            raise self.fail(at, f"{len(value)} steps; a scenario holds at most {MAX_STEPS}: split it")
        return tuple(self._step(raw, at + (i,), str(first + i)) for i, raw in enumerate(value))

    def _step(self, raw, at: tuple, number: str, grouped: bool = False) -> Step:
        if not isinstance(raw, dict):
            raise self.fail(at, f"expected a step (a mapping with flow:, fault:, expect:, table: or parallel:), "
                                f"got {_kind(raw)}")
        # a fault may name a flow (block), so fault: decides before flow:
        kinds = [k for k in ("fault" if "fault" in raw else "flow", "expect", "table", "parallel", "holds") if k in raw]
        if len(kinds) != 1:
            raise self.fail(at, "a step is one of: a workflow (flow:), a fault (fault:), an expectation (expect: or "
                                "holds:), a table (table:) or a group (parallel:)"
                                + (f"; this one has {', '.join(kinds)}" if kinds else ""))
        where = f"{self.doc.path}:{self.doc.line(at)}"
        kind = kinds[0]
        if kind == "parallel":
            if grouped:
                raise self.fail(at + ("parallel",), "a parallel group cannot hold another group")
            return self._parallel(raw, at, number, where)
        if kind == "expect":
            if grouped:
                raise self.fail(at + ("expect",), "expectations come after a parallel group, not inside it")
            return self._expect(raw, at, number, where)
        if kind == "table":
            if grouped:
                raise self.fail(at + ("table",), "a table comes after the workflows it shows, not inside a group")
            return self._table(raw, at, number, where)
        if kind == "holds":
            if grouped:
                raise self.fail(at + ("holds",), "expectations come after a parallel group, not inside it")
            return self._holds(raw, at, number, where)
        if kind == "fault":
            return self._fault(raw, at, number, where)
        return self._workflow(raw, at, number, where)

    def _parallel(self, raw, at, number, where) -> Parallel:
        self.mapping(raw, at, ("parallel",))
        items = raw["parallel"]
        if not isinstance(items, list) or len(items) < 2:
            raise self.fail(at + ("parallel",), "expected a list of at least two steps to run together")
        steps = tuple(self._step(item, at + ("parallel", i), f"{number}.{i + 1}", grouped=True)
                      for i, item in enumerate(items))
        return Parallel(where, number, steps)

    def _new_id(self, value, at: tuple) -> str:
        if not isinstance(value, str) or not STEP_ID.match(value):
            raise self.fail(at, f"{value!r}: an id is a short lowercase word (letters, digits, '-'), like login-site1")
        if value in self.ids:
            raise self.fail(at, f"id {value!r} is already used by an earlier step; ids are unique")
        self.ids.add(value)
        return value

    def _workflow(self, raw, at, number, where) -> Workflow:
        self.mapping(raw, at, WORKFLOW_KEYS, ("id", "do", "flow", "from", "to"))
        step_id = self._new_id(raw["id"], at + ("id",))
        text = self.text(raw["do"], at + ("do",))
        flow = self.flow(raw["flow"], at + ("flow",))
        client = self.host(raw["from"], at + ("from",))
        server = self.host(raw["to"], at + ("to",))
        if client == server:
            raise self.fail(at + ("to",), "client and server are one host: a flow in the lab crosses the network")
        server_roles = self.topology.host(server).roles
        if flow.server not in server_roles:
            holders = [h.name for h in self.topology.hosts_with_role(flow.server)]
            raise self.fail(at + ("to",), f"{server} does not run {flow.server}, the server of {flow.id} "
                                          f"(hosts that do: {', '.join(holders) or 'none'})")
        endpoints = self._endpoints(flow, raw, at)
        mode = ""
        if any(ep.protocol == "ftp" for ep in endpoints):
            mode = raw.get("mode", "passive")
            if mode not in FTP_MODES:
                raise self.fail(at + ("mode",), f"unknown FTP mode {mode!r}; use one of {', '.join(FTP_MODES)}")
        elif "mode" in raw:
            raise self.fail(at + ("mode",), f"mode is for FTP flows; {flow.id} is not one")
        options = raw.get("options", {})
        if not isinstance(options, dict) or not all(isinstance(v, (str, int, float, bool)) for v in options.values()):
            raise self.fail(at + ("options",), "expected a mapping of probe options with plain values, like {card: '1234'}")
        timeout = self.timeout
        if "timeout" in raw:
            timeout = self.number(raw["timeout"], at + ("timeout",), 0.1, MAX_TIMEOUT, "seconds")
        size = self._size(raw["size"], at + ("size",)) if "size" in raw else None
        carries = self._carries(raw["carries"], at + ("carries",), endpoints, client) if "carries" in raw else ""
        if carries:
            options = {**options, "carries": carries, "holder": client}
        self.workflow_ids.add(step_id)
        workflow = Workflow(where, number, step_id, text, flow, client, server, endpoints, dict(options), mode,
                            timeout, size, carries)
        self.workflows[step_id] = workflow
        return workflow

    def _carries(self, value, at: tuple, endpoints: tuple[Endpoint, ...], client: str) -> str:
        """A document name the workflow passes on; its first workflow's host is where it is created."""
        if not isinstance(value, str) or not STEP_ID.match(value):
            raise self.fail(at, f"{value!r}: a document is named like a step id (lowercase letters, digits, '-'), "
                                "like report-1")
        others = sorted({ep.protocol for ep in endpoints if ep.protocol not in CARRYING_PROTOCOLS})
        if others:
            raise self.fail(at, f"{', '.join(others)} cannot carry a document here; pick a port with protocol: "
                                f"(those that can: {', '.join(CARRYING_PROTOCOLS)})")
        self.origins.setdefault(value, client)
        return value

    def _holds(self, raw, at, number, where) -> Holds:
        self.mapping(raw, at, HOLDS_KEYS, ("holds", "at"))
        name = raw["holds"]
        if name not in self.origins:
            known = ", ".join(sorted(self.origins)) or "none yet"
            raise self.fail(at + ("holds",), f"{name!r} is not carried by an earlier workflow (carries: {known})")
        host = self.host(raw["at"], at + ("at",))
        kind = raw.get("in", "")
        if "in" in raw and kind not in HELD_KINDS:
            raise self.fail(at + ("in",), f"unknown kind {kind!r}; use one of {', '.join(HELD_KINDS)}")
        above, below = self._bounds(raw, "metadata_kb", at, "kB, 1000 bytes")
        says = self.text(raw["says"], at + ("says",)) if "says" in raw else ""
        return Holds(where, number, name, host, self.origins[name], kind, above, below, says)

    def _size(self, value, at: tuple) -> int:
        """Bytes: a whole number, or a number with a unit (16 MB, 512 KiB; MB = 10^6 B, MiB = 2^20 B)."""
        if isinstance(value, int) and not isinstance(value, bool):
            size = value
        else:
            match = SIZE.match(value.strip()) if isinstance(value, str) else None
            if not match:
                raise self.fail(at, f"expected a size like 16 MB, 512 KiB or 4096 (bytes), got {_kind(value)}; "
                                    f"units: {', '.join(SIZE_UNITS)}")
            size = round(float(match.group(1)) * SIZE_UNITS[match.group(2)])
        if not 0 <= size <= MAX_SIZE:
            raise self.fail(at, f"{size} bytes is out of range: give 0 to {MAX_SIZE // 1024 ** 2} MiB")
        return size

    def _endpoints(self, flow: Flow, raw: dict, at: tuple) -> tuple[Endpoint, ...]:
        used = [ep for ep in flow.endpoints
                if ep.channel == "service" and not excluded_by_profile(flow, ep, self.topology.profile)]
        for key in ("security", "protocol"):
            if key in raw:
                offered = sorted({getattr(ep, key) for ep in used})
                if raw[key] not in offered:
                    raise self.fail(at + (key,), f"flow {flow.id} has no {key} {raw[key]!r} here; it has: "
                                                 f"{', '.join(offered) or 'nothing the site uses'}")
                used = [ep for ep in used if getattr(ep, key) == raw[key]]
        if not used:
            raise self.fail(at + ("flow",), f"flow {flow.id} has nothing this site's profile uses")
        return tuple(used)

    def _expect(self, raw, at, number, where) -> Expect:
        self.mapping(raw, at, EXPECT_KEYS)
        target = raw["expect"]
        if target not in self.workflow_ids:
            known = ", ".join(sorted(self.workflow_ids)) or "none yet"
            raise self.fail(at + ("expect",), f"{target!r} is not the id of an earlier workflow step ({known})")
        outcome = raw.get("outcome", "")
        if "outcome" in raw and outcome not in OUTCOME_GROUPS:
            raise self.fail(at + ("outcome",), f"unknown outcome {outcome!r}; use one of {', '.join(OUTCOME_GROUPS)}")
        above, below = self._bounds(raw, "elapsed_ms", at)
        rtt_above, rtt_below = self._bounds(raw, "round_trip_ms", at)
        if "round_trip_ms" in raw:
            rounds = self.workflows[target].options.get("rounds")
            if isinstance(rounds, bool) or not isinstance(rounds, int) or not 0 < rounds <= MAX_ROUNDS:
                raise self.fail(at + ("round_trip_ms",), f"step {target!r} measures no round trip: give it "
                                                         f"options: {{rounds: N}} (1 to {MAX_ROUNDS} small request/"
                                                         "reply round trips on its connection, framed flows)")
        if not outcome and above is None and below is None and rtt_above is None and rtt_below is None:
            raise self.fail(at, "an expectation needs outcome:, elapsed_ms: or round_trip_ms:")
        says = self.text(raw["says"], at + ("says",)) if "says" in raw else ""
        detail = self.text(raw["detail"], at + ("detail",)) if "detail" in raw else ""
        return Expect(where, number, target, outcome, above, below, says, rtt_above, rtt_below, detail)

    def _bounds(self, raw: dict, key: str, at: tuple, unit: str = "milliseconds") -> tuple[float | None, float | None]:
        """(above, below) `unit` of an expectation's `key: {above: N, below: N}`; None where not given."""
        if key not in raw:
            return None, None
        bounds = self.mapping(raw[key], at + (key,), ("above", "below"))
        if not bounds:
            raise self.fail(at + (key,), f"give above: and/or below: ({unit})")
        above = below = None
        if "above" in bounds:
            above = self.number(bounds["above"], at + (key, "above"), 0, 3_600_000, unit)
        if "below" in bounds:
            below = self.number(bounds["below"], at + (key, "below"), 0, 3_600_000, unit)
        if above is not None and below is not None and above >= below:
            raise self.fail(at + (key,), f"above {above:g} and below {below:g} cannot both hold")
        return above, below

    def _table(self, raw, at, number, where) -> Table:
        self.mapping(raw, at, TABLE_KEYS, ("table", "mbit"))
        ids = raw["table"]
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            raise self.fail(at + ("table",), f"expected a list of earlier workflow ids, got {_kind(ids)}")
        for i, target in enumerate(ids):
            if target not in self.workflow_ids:
                known = ", ".join(sorted(self.workflow_ids)) or "none yet"
                raise self.fail(at + ("table", i), f"{target!r} is not the id of an earlier workflow step ({known})")
            workflow = self.workflows[target]
            if workflow.size is None:
                raise self.fail(at + ("table", i), f"step {target!r} has no size: give it size: (e.g. 4 MB) so "
                                                   "its delivery time can be predicted")
            if len(workflow.endpoints) != 1:
                raise self.fail(at + ("table", i), f"step {target!r} runs {len(workflow.endpoints)} deliveries at once "
                                                   "(one per port of its flow), sharing the link: pick one with "
                                                   "protocol: or security:")
        if len(set(ids)) != len(ids):
            raise self.fail(at + ("table",), "a workflow is listed twice")
        mbit = self.number(raw["mbit"], at + ("mbit",), 0.01, 100_000, "Mbit/s, the link's rate")
        within = None
        if "within" in raw:
            value = raw["within"]
            if isinstance(value, str) and value.strip().endswith("%"):
                try:
                    value = float(value.strip()[:-1])
                except ValueError:
                    pass
            within = self.number(value, at + ("within",), 0.1, 100, "percent, like 20%")
        says = self.text(raw["says"], at + ("says",)) if "says" in raw else ""
        return Table(where, number, tuple(ids), mbit, within, says)

    def _fault(self, raw, at, number, where) -> Fault:
        kind = raw["fault"]
        if kind not in FAULTS:
            raise self.fail(at + ("fault",), f"unknown fault {kind!r}; use one of {', '.join(FAULTS)}")
        self.mapping(raw, at, ("fault", "do", "id") + FAULT_KEYS[kind], FAULT_REQUIRED[kind])
        if "id" in raw:
            self._new_id(raw["id"], at + ("id",))
        text = self.text(raw["do"], at + ("do",)) if "do" in raw else ""
        fields: dict[str, Any] = {}
        if "link" in raw:
            link = raw["link"]
            if link not in self.impairable:
                listed = ", ".join(self.impairable) or "none: add impairable: [LINK] to the scenario"
                raise self.fail(at + ("link",), f"link {link!r} is not impairable in this scenario (impairable: {listed})")
            fields["link"] = link
        if kind == "delay":
            fields["ms"] = self.number(raw["ms"], at + ("ms",), 0.1, 10_000, "milliseconds of added round-trip time")
            if "jitter_ms" in raw:
                fields["jitter_ms"] = self.number(raw["jitter_ms"], at + ("jitter_ms",), 0, 10_000, "milliseconds")
        elif kind == "loss":
            fields["percent"] = self.number(raw["percent"], at + ("percent",), 0.01, 100, "percent")
        elif kind == "bandwidth":
            fields["mbit"] = self.number(raw["mbit"], at + ("mbit",), 0.01, 100_000, "Mbit/s")
        elif kind in ("stop", "start"):
            fields["host"] = self.host(raw["host"], at + ("host",))
        elif kind == "certificate":
            fields["host"] = self.host(raw["host"], at + ("host",))
            if raw["kind"] not in CERTIFICATE_KINDS:
                raise self.fail(at + ("kind",), f"unknown certificate kind {raw['kind']!r}; use one of "
                                                f"{', '.join(CERTIFICATE_KINDS)}")
            fields["certificate"] = raw["kind"]
        elif kind in ("ftp-helper-off", "reset-rules") and "node" in raw:
            fields["node"] = self.rule_node(raw["node"], at + ("node",))
        elif kind == "generated-rules" and "node" in raw:
            fields["node"] = self.rule_node(raw["node"], at + ("node",))
            if not self.topology.is_firewall(fields["node"]):
                raise self.fail(at + ("node",), f"rules are generated for firewall nodes only "
                                                f"({', '.join(fw.name for fw in self.topology.firewalls)})")
        elif kind == "rule":
            fields["node"] = self.rule_node(raw["node"], at + ("node",))
            fields["rule"] = self._rule_text(raw["rule"], at + ("rule",))
        elif kind == "block":
            fields.update(self._block(raw, at))
        return Fault(where, number, kind, text, **fields)

    def _rule_text(self, value, at: tuple) -> str:
        """iptables arguments, with {host} and {zone} replaced by the host's address or the zone's subnet."""
        text = self.text(value, at)
        names = {h.name: h.address for h in self.topology.hosts}
        names.update({z.name: str(z.subnet) for z in self.topology.zones})

        def address(match):
            if match.group(1) not in names:
                raise self.fail(at, f"{{{match.group(1)}}} names no host or zone of topology {self.topology.name}")
            return names[match.group(1)]

        text = PLACEHOLDER.sub(address, text)
        try:
            argv = shlex.split(text)
        except ValueError as exc:
            raise self.fail(at, f"cannot split the rule into words ({exc})") from None
        if not argv or argv[0] not in ("-I", "-A") or len(argv) < 3:
            raise self.fail(at, "an iptables rule to add: -I CHAIN ... or -A CHAIN ..., e.g. "
                                "\"-I FORWARD -s {pc1} -d {db1} -j ACCEPT\"")
        for word in argv:
            for part in re.split(r"[/,]", word):
                if re.fullmatch(r"\d+\.\d+\.\d+\.\d+", part) and ipaddress.ip_address(part) not in ipaddress.ip_network("198.18.0.0/15"):
                    raise self.fail(at, f"{part} is outside the lab (198.18.0.0/15): name hosts as {{host}}")
        return text

    def _block(self, raw, at) -> dict:
        flow = self.flow(raw["flow"], at + ("flow",))
        client = self.host(raw["from"], at + ("from",))
        server = self.host(raw["to"], at + ("to",))
        enforcers = self.topology.enforcers(client, server)
        if "node" in raw:
            node = self.rule_node(raw["node"], at + ("node",))
            if node not in [e.node for e in enforcers]:
                raise self.fail(at + ("node",), f"{node} is not on the path from {client} to {server} "
                                                f"({', '.join(e.node for e in enforcers) or 'no firewall between them'})")
        elif enforcers:
            node = enforcers[0].node
        else:
            raise self.fail(at + ("to",), f"no firewall stands between {client} and {server}: nothing can block it")
        used = [ep for ep in flow.endpoints if ep.channel == "service" and ep.port is not None]
        security = raw.get("security", "")
        if security:
            offered = sorted({ep.security for ep in used})
            if security not in offered:
                raise self.fail(at + ("security",), f"flow {flow.id} has no security {security!r}; it has: {', '.join(offered)}")
        action = raw.get("action", "drop")
        if action not in RULE_ACTIONS:
            raise self.fail(at + ("action",), f"unknown action {action!r}; use one of {', '.join(RULE_ACTIONS)}")
        if not used:
            raise self.fail(at + ("flow",), f"flow {flow.id} has no port a rule could match")
        return {"flow": flow, "client": client, "server": server, "node": node, "security": security, "action": action}


def _kind(value) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: f"text {value!r}", bool: f"{str(value).lower()}"}.get(
        type(value), f"{type(value).__name__} {value!r}")


def load_scenario(name_or_path: str | Path, catalog: Catalog | None = None) -> Scenario:
    """Read and validate a scenario: a LabError naming file, line and key, or a Scenario ready to run."""
    path = resolve_scenario_path(str(name_or_path))
    return _Validator(read_document(path), catalog or load_catalog()).scenario()
