"""`safeq-lab` command line. The only place that prints for people and chooses exit codes."""
from __future__ import annotations

import sys

import _signal  # the C module: `signal` builds its enums first, long enough for a Ctrl-C to land in


def _interrupted_while_starting(_signum, _frame):
    # Ctrl-C while the rest of this module is still importing: nothing exists yet to tear down
    print("safeq-lab: interrupted while starting; nothing was created", file=sys.stderr)
    sys.exit(130)


_AS_COMMAND = __name__ == "__main__" or sys.argv[0].rsplit("/", 1)[-1] == "safeq-lab"  # run as the command, not imported
if _AS_COMMAND:
    _signal.signal(_signal.SIGINT, _interrupted_while_starting)

import argparse
import gc
import json
import math
import os
import re
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from emulator.errors import LabError

EXIT_USAGE = 4
EXIT_INTERRUPTED = 130
EXIT_INTERNAL = 70
MAX_HOSTS_LISTED = 60  # `up` lists hosts by name up to this many (a fleet has thousands)
MAX_TIMEOUT = 600.0  # seconds a probe may take; more is a typo, not a slow network
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


class _UsageError(Exception):
    """A command line argparse cannot parse; the message names the `--help` to read."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit 4 like every other bad input (not usage + exit 2)."""

    def error(self, message):
        raise _UsageError(f"{message}; see `{self.prog} --help`")


def _one_line(text: str) -> str:
    """A message fit for one terminal line: line breaks become spaces, other control characters escapes."""
    text = re.sub(r"\s*[\r\n]+\s*", " ", str(text)).strip()
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT):
        raise argparse.ArgumentTypeError(f"{text}: give seconds above 0 and at most {MAX_TIMEOUT:g}")
    return value


def _writable(path_text: str, option: str) -> Path:
    """The file an option names, proven writable now: a report must not be lost after a whole audit."""
    path = Path(path_text)
    if path.is_dir():
        raise LabError(f"{option} {path} is a directory; give a file name")
    if not path.parent.is_dir():
        raise LabError(f"{option} {path}: directory {path.parent} does not exist; create it or give another path")
    try:
        if path.exists():
            with open(path, "a"):
                pass
        else:
            with open(path, "x"):
                pass
            path.unlink()
    except OSError as exc:
        raise LabError(f"{option} {path} cannot be written ({exc.strerror or exc.__class__.__name__}); "
                       "give a writable path") from None
    return path


def _write(path: Path, text: str, option: str) -> None:
    try:
        path.write_text(text)
    except OSError as exc:
        raise LabError(f"{option} {path} could not be written ({exc.strerror or exc.__class__.__name__}); "
                       "give a writable path") from None


class _Terminated(BaseException):
    """SIGTERM/SIGHUP, raised in the main thread so every `finally` tears the lab down."""


def _raise_terminated(signum, _frame):
    raise _Terminated(signal.Signals(signum).name)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="safeq-lab", description="Emulate a YSoft SafeQ 6 network and audit a firewall against it.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}",
                        help="print the installed version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    cat = sub.add_parser("catalog", help="list and filter the catalog's flows")
    cat.add_argument("--role", help="role id or vendor wording (client or server side)")
    cat.add_argument("--port", type=int, help="a port number (matches ranges too)")
    cat.add_argument("--protocol", help="wire protocol id (http, ldap, ftp, ...) or vendor wording")
    cat.add_argument("--section", help="vendor table section, e.g. 'Terminal Server'")
    cat.add_argument("--roles", action="store_true", help="list the canonical roles instead of flows")
    cat.add_argument("--json", action="store_true", help="machine-readable output")

    rules = sub.add_parser("rules", help="firewall rulesets")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True, metavar="ACTION")
    gen = rules_sub.add_parser("generate", help="write the least-privilege ruleset for a topology")
    _topology_arg(gen)
    gen.add_argument("--format", choices=("iptables", "nft", "aerleon"), default="iptables",
                     help="aerleon: an Aerleon policy and its definitions, to render for your own firewall (needs -o DIR)")
    gen.add_argument("--node", help="the firewall node or host-firewall host to write rules for (default: the first firewall node)")
    gen.add_argument("-o", "--output", help="file to write (default: standard output); a directory for aerleon")
    check = rules_sub.add_parser("check", help="validate a ruleset file without building a lab")
    check.add_argument("file")
    _topology_arg(check)
    check.add_argument("--node", help="the firewall node or host the rules are for: nft `iif`/`oif` may name only its "
                                      "interfaces (default: any interface of the topology)")

    audit = sub.add_parser("audit", help="build the lab, probe every flow, print verdicts, tear down")
    _topology_arg(audit)
    _rules_arg(audit)
    audit.add_argument("--against", metavar="[NODE=]FILE", action="append", default=[],
                       help="differential audit: run the same lab with these rules too and list only the checks "
                            "whose verdict changed, with the rule responsible on each side")
    audit.add_argument("--json", metavar="FILE", help="also write the full report as JSON (schema 2)")
    audit.add_argument("--report", metavar="DIR",
                       help="also write DIR/report.json (schema 3), DIR/junit.xml (one test case per check, for CI) "
                            "and DIR/report.html (one self-contained page); DIR is created if missing")
    audit.add_argument("--pcap", action="store_true",
                       help="capture every filtering node's traffic during the audit and write one pcap per finding "
                            "to DIR/pcap/ (needs --report DIR and tcpdump)")
    shown = audit.add_mutually_exclusive_group()
    shown.add_argument("--all", action="store_true",
                       help="list every check, exposure knocks that were closed included (default: a zone x zone "
                            "matrix, then only what is wrong)")
    shown.add_argument("--quiet", "-q", action="store_true", help="print only the totals and the verdict, no progress")
    audit.add_argument("--timeout", type=_timeout, default=5.0, help="seconds a probe may take; a dropped SYN costs this once, not per flow (default 5)")

    up = sub.add_parser("up", help="build the lab and open Mininet's CLI; leaving it tears everything down")
    _topology_arg(up)
    _rules_arg(up)

    topo = sub.add_parser("topology", help="show a topology's zones, hosts and addresses")
    _topology_arg(topo)

    persona = sub.add_parser("persona", help="device personas recorded from real devices")
    persona_sub = persona.add_subparsers(dest="persona_command", required=True, metavar="ACTION")
    from emulator import persona_import
    persona_import.add_arguments(persona_sub.add_parser(
        "import", help="build a persona from snmpwalk -On / .snmprec and ipptool -tv captures of a real device"))

    from emulator.scenario import command as scenario_command
    scenario_command.add_arguments(sub)

    clean = sub.add_parser("clean", help="remove whatever a killed run left behind")
    clean.add_argument("--force", action="store_true", help="also stop a lab that is still running")

    run_in = sub.add_parser("exec", help="run a command inside a host of a lab `safeq-lab up` keeps running "
                                         "(e.g. from another terminal)",
                            usage="safeq-lab exec [-h] [--run ID] HOST -- COMMAND [ARG ...]")
    run_in.add_argument("--run", metavar="ID", help="the lab's run id (printed by `up`): needed when several labs are up")
    run_in.add_argument("host", metavar="HOST", help="a host or firewall node of the running lab")
    run_in.add_argument("argv", metavar="COMMAND", nargs=argparse.REMAINDER, help="the command and its arguments, after --")

    completion = sub.add_parser("completion", help="print a shell completion script: "
                                                   "`source <(safeq-lab completion bash)`")
    completion.add_argument("shell", choices=("bash", "zsh"))
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("safeq-lab")
    except PackageNotFoundError:  # a source tree that was never installed
        return "(not installed: run ./setup.sh)"


def _topology_arg(p):
    p.add_argument("--topology", "-t", default="single-site", help="name in topologies/ or a path (default single-site)")


def _rules_arg(p):
    p.add_argument("--rules", "-r", metavar="[NODE=]FILE", action="append", default=[],
                   help="your iptables-save or nft ruleset: FILE for the (first) firewall node, NODE=FILE for another "
                        "firewall node or for a host's own firewall; repeatable (default: the topology's rules "
                        "files, else the generated least-privilege rules)")
    p.add_argument("--certs", metavar="DIR",
                   help="your certificates: DIR/ca.pem and DIR/<host>.pem + DIR/<host>.key replace the pre-installed lab ones")


def _raised_while_interrupted(exc: BaseException) -> bool:
    """True when an interrupt (Ctrl-C, SIGTERM) is in the exception's context chain."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (KeyboardInterrupt, _Terminated)):
            return True
        exc = exc.__context__ or exc.__cause__
    return False


def _ignore_interrupts() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_terminated)
    try:
        try:
            args = _build_parser().parse_args(argv)
        except _UsageError as exc:
            print(f"safeq-lab: error: {_one_line(exc)}", file=sys.stderr)
            return EXIT_USAGE
        status = _COMMANDS[args.command](args)
        # done, the lab down: a Ctrl-C while the interpreter exits (joining its threads) must not
        # end the process by SIGINT instead of with its status
        _ignore_interrupts()
        return status
    except LabError as exc:
        print(f"safeq-lab: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except (KeyboardInterrupt, _Terminated):
        # Lab.close() defers these signals until teardown is done, so the lab is down by now;
        # a further signal must not turn this message into a traceback.
        _ignore_interrupts()
        print("safeq-lab: interrupted; the lab was torn down", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0
    except Exception as exc:  # a bug of ours: still one line, the traceback on request
        if os.environ.get("SAFEQ_LAB_DEBUG"):
            raise
        if _raised_while_interrupted(exc):
            # cleaning up after Ctrl-C failed part-way: say so rather than claim a clean teardown
            print(f"safeq-lab: interrupted; teardown did not finish ({exc.__class__.__name__}: {_one_line(exc)}): "
                  "run `safeq-lab clean`", file=sys.stderr)
            return EXIT_INTERRUPTED
        print(f"safeq-lab: internal error: {exc.__class__.__name__}: {_one_line(exc)} "
              "(a bug: rerun with SAFEQ_LAB_DEBUG=1 for the traceback and report it; `safeq-lab clean` removes leftovers)",
              file=sys.stderr)
        return EXIT_INTERNAL


def _cmd_catalog(args) -> int:
    from emulator.catalog import load_catalog

    catalog = load_catalog()
    if args.roles:
        for role in catalog.roles.values():
            print(f"{role.id:36} {role.kind:9} {role.name}")
        return 0
    flows = catalog.filter(role=args.role, port=args.port, protocol=args.protocol, section=args.section)
    if args.json:
        print(json.dumps([_flow_dict(f) for f in flows], indent=1))
        return 0
    for f in flows:
        ports = ", ".join(f"{ep.label()} {ep.protocol}{'' if ep.security == 'plain' else '+' + ep.security}" for ep in f.endpoints)
        print(f"{f.id:26} {f.client_text} -> {f.server_text}: {ports or '-'}"
              + (f"  [not exercised: {f.why_not}]" if f.why_not else ""))
    print(f"{len(flows)} of {len(catalog.flows)} flows")
    return 0


def _flow_dict(flow) -> dict:
    return {"id": flow.id, "section": flow.section, "row": flow.row, "client": flow.client, "server": flow.server,
            "client_text": flow.client_text, "server_text": flow.server_text, "application": flow.application,
            "data": flow.data, "endpoints": [{"label": ep.label(), "protocol": ep.protocol, "security": ep.security,
                                              "channel": ep.channel} for ep in flow.endpoints],
            "why_not": flow.why_not}


def _plan(topology_name: str, host_rules: dict[str, str] | None = None):
    from emulator.plan import audit_plan

    catalog, topology = _lab_of(topology_name, host_rules)
    return catalog, topology, audit_plan(catalog, topology)


def _lab_of(topology, host_rules: dict[str, str] | None = None):
    """(catalog, topology with its host firewalls): `topology` is a name or an already loaded one."""
    from emulator.catalog import load_catalog
    from emulator.topology import load_topology

    catalog = load_catalog()
    topology = load_topology(topology) if isinstance(topology, str) else topology
    if host_rules:
        topology = topology.with_host_rules(host_rules)
    return catalog, topology


def _rules_entries(entries: list[str]) -> dict[str | None, str]:
    """`FILE` or `NODE=FILE` entries -> {node or None: file}; a node named twice is a mistake."""
    given: dict[str | None, str] = {}
    for entry in entries:
        node, sep, path = entry.partition("=")
        node, path = (node, path) if sep and "/" not in node else (None, entry)
        if node in given:
            raise LabError(f"--rules names {node or 'the firewall node'} twice; give one file per node")
        given[node] = path
    return given


def _cmd_rules(args) -> int:
    from emulator import rules

    if args.rules_command == "check":
        from emulator.topology import load_topology

        topology = load_topology(args.topology)
        if args.node is not None and not (topology.is_firewall(args.node) or args.node in {h.name for h in topology.hosts}):
            raise LabError(f"--node {args.node}: not a firewall node or host of topology {topology.name} "
                           f"(firewall nodes: {', '.join(fw.name for fw in topology.firewalls)})")
        owner = (f"topology {topology.name}" if args.node is None else
                 f"{'firewall node' if topology.is_firewall(args.node) else 'host'} {args.node} of topology {topology.name}")
        ruleset = rules.load_rules_file(args.file, rules.node_interfaces(topology, args.node), owner)
        nat = (" (with NAT rules: allowed, and a flow they translate is graded BROKEN because its server sees "
               "another source address)" if rules.translates_addresses(ruleset) else "")
        print(f"{args.file}: valid {ruleset.format} ruleset{nat}")
        return 0
    if args.format == "aerleon" and not args.output:
        raise LabError("the aerleon format writes several files: give a directory with -o DIR")
    output = _writable(args.output, "-o") if args.output and args.format != "aerleon" else None
    _catalog, topology, checks = _plan(args.topology)
    if args.format == "aerleon":
        from emulator import aerleon_policy  # aerleon is only needed for this format

        files = aerleon_policy.policy_files(topology, checks)
        out = Path(args.output)
        try:
            out.mkdir(parents=True, exist_ok=True)
            for name, text in files.items():
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                (out / name).write_text(text)
        except OSError as exc:
            raise LabError(f"-o {out}: cannot write the policy there ({exc.strerror or exc.__class__.__name__}: "
                           f"{exc.filename}); give a writable directory") from None
        print(f"wrote {', '.join(sorted(files))} to {out} (render with aerleon for your firewall)", file=sys.stderr)
        return 0
    ruleset = rules.generate(topology, checks, args.format, node=args.node)
    if output is not None:
        _write(output, ruleset.text, "-o")
        print(f"wrote {args.output} ({ruleset.text.count(chr(10))} lines, {args.format})", file=sys.stderr)
    else:
        sys.stdout.write(ruleset.text)
    return 0


def _rulesets(entries: list[str], topology, checks, certs: str | None = None) -> dict:
    """node -> Ruleset for every filtering node: given on the command line, else the topology's
    rules file, else (firewall nodes) the generated least-privilege rules."""
    return _with_generated(_given_rulesets(entries, topology, certs), topology, checks)


def _with_generated(chosen: dict, topology, checks) -> dict:
    """`chosen` (node -> Ruleset), with the generated least-privilege rules of each firewall node it lacks."""
    from emulator import rules

    chosen = dict(chosen)
    for fw in topology.firewalls:
        if fw.name not in chosen:
            chosen[fw.name] = rules.generate(topology, checks, node=fw.name)
    return chosen


def _given_rulesets(entries: list[str], topology, certs: str | None = None) -> dict:
    """node -> Ruleset given on the command line, else in the topology's rules file: every file
    loaded and checked (as is --certs), so a bad one fails before anything is built."""
    from emulator import pki, rules

    if certs:  # checked before anything is built
        pki.load_pki_dir(certs, [h.name for h in topology.hosts])
    given = _rules_entries(entries)
    if None in given:
        given[topology.firewall] = given.pop(None)
    unknown = set(given) - set(topology.filtering_nodes)
    if unknown:
        raise LabError(f"--rules names {', '.join(sorted(unknown))}: not a firewall node or host of topology "
                       f"{topology.name} (nodes: {', '.join(topology.filtering_nodes)})")
    chosen = {}
    for node, path in [*topology.rules_files.items(), *given.items()]:
        owner = f"{'firewall node' if topology.is_firewall(node) else 'host'} {node} of topology {topology.name}"
        chosen[node] = rules.load_rules_file(str(path), rules.node_interfaces(topology, node), owner)
    return chosen


def _host_rules(entries: list[str], topology) -> dict[str, str]:
    """Host firewalls given on the command line: they change the plan (the host filters its traffic).
    `topology`: a name or an already loaded one."""
    from emulator.topology import load_topology

    topology = load_topology(topology) if isinstance(topology, str) else topology
    firewalls = {fw.name for fw in topology.firewalls}
    return {node: path for node, path in _rules_entries(entries).items() if node and node not in firewalls}


def _describe_rules(rulesets: dict) -> str:
    return "; ".join(f"{node}: {r.source}" for node, r in rulesets.items())


def _cmd_audit(args) -> int:
    from emulator import pcap, report_files, report_json
    from emulator.audit import AUDIT_PHASES
    from emulator.console import AuditConsole
    from emulator.lab import Lab, preflight
    from emulator.report import format_console, format_diff, verdict_line
    from emulator.report_model import Zones

    preflight()
    if args.pcap and not args.report:
        raise LabError("--pcap writes one capture per finding next to the report: give --report DIR too")
    if args.pcap:
        pcap.require_tcpdump()
    json_path = _writable(args.json, "--json") if args.json else None  # before the lab: the report must not be lost
    report_dir = report_files.prepare(args.report, pcap=args.pcap) if args.report else None
    from emulator.topology import load_topology

    named = load_topology(args.topology)
    catalog, topology = _lab_of(named, {**_host_rules(args.rules, named), **_host_rules(args.against, named)})
    given = _given_rulesets(args.rules, topology, args.certs)  # bad rules files fail here, before any lab
    given_against = _given_rulesets(args.against, topology) if args.against else None
    zones = Zones.of(topology)
    audits = 2 if given_against is not None else 1
    steps = 1 + audits * (len(AUDIT_PHASES) + args.pcap) + (report_dir is not None)
    pcaps: list[dict] = []
    started = time.monotonic()
    with AuditConsole(quiet=args.quiet) as console:
        console.begin(steps, f"building the {topology.name} lab ({len(topology.hosts)} hosts) and starting its daemons")
        # the plan and the generated rules need no network: made meanwhile (Mininet mostly waits on its commands)
        planning = _meanwhile(_planned, catalog, topology, given, given_against)
        with Lab(topology, catalog, certs_dir=args.certs) as lab:
            checks, rulesets, against = planning.result()
            lab.apply_rules(rulesets)
            console.note(f"safeq-lab: {topology.name} up in {time.monotonic() - started:.1f}s ({len(topology.hosts)} "
                         f"hosts); probing {sum(c.kind == 'required' for c in checks)} required flow checks and "
                         f"knocking {sum(c.kind == 'exposure' for c in checks)} exposure ports")
            report = _audited(args, lab, checks, rulesets, console, pcaps, "before-" if audits == 2 else "",
                              report_dir, explain_all=against is not None)
            if against is not None:
                lab.apply_rules(against)
                second = _audited(args, lab, checks, against, console, pcaps, "after-", report_dir, explain_all=True)
        report.timings.update(lab.timings)
        report.timings["total"] = time.monotonic() - started
        final = second if against is not None else report
        if report_dir is not None:
            console.step(f"writing the report to {report_dir}")
            if against is not None:
                document = report_json.differential_document(report, second, zones, *pcaps, include_closed=args.all)
            else:
                document = report_json.audit_document(report, zones, pcaps[0] if pcaps else None, include_closed=args.all)
            report_files.write(report_dir, document, final, zones, pcaps[-1] if pcaps else None)
        if against is not None:
            console.report(verdict_line(second) if args.quiet else format_diff(report, second))
        else:
            console.report(format_console(report, zones, "quiet" if args.quiet else "all" if args.all else "default"))
        if report_dir is not None:
            cut = sum(1 for found in pcaps for p in found.values() if p.name)
            console.note(f"safeq-lab: report in {report_dir}/: {report_files.REPORT_HTML}, {report_files.JUNIT_XML}, "
                         f"{report_files.REPORT_JSON}" + (f"; {cut} pcaps in {report_dir}/{report_files.PCAP_DIR}/"
                                                          if args.pcap else ""))
    if json_path is not None:
        if against is not None:
            _write(json_path, json.dumps({"before": report.to_dict(), "after": second.to_dict()}, indent=1), "--json")
        else:
            _write(json_path, json.dumps(report.to_dict(include_closed=args.all), indent=1), "--json")
    if _AS_COMMAND:  # the interpreter's last collection would walk every object of the audit for nothing (~0.1 s)
        gc.freeze()
    return final.exit_status


def _planned(catalog, topology, given: dict, given_against: dict | None):
    """An audit's checks, and its rulesets (and the --against ones) completed with the generated rules."""
    from emulator.plan import audit_plan

    checks = audit_plan(catalog, topology)
    against = _with_generated(given_against, topology, checks) if given_against is not None else None
    return checks, _with_generated(given, topology, checks), against


def _meanwhile(fn, *args) -> Future:
    """fn(*args) in a thread of its own; its result (or exception) from `.result()`."""
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(fn, *args)
    finally:
        pool.shutdown(wait=False)


def _audited(args, lab, checks, rulesets, console, pcaps: list, prefix: str, report_dir, explain_all: bool):
    """One audit of the lab as it is, captured with --pcap (then one pcap per finding is cut, in pcaps)."""
    from emulator import pcap, report_files
    from emulator.audit import run_audit
    from emulator.report_model import findings

    def audit():
        return run_audit(lab, checks, _describe_rules(rulesets), timeout=args.timeout, rulesets=rulesets,
                         explain_all=explain_all, progress=console.progress)

    if not args.pcap:
        return audit()
    nodes = sorted({e.node for c in checks for e in c.enforcers})
    with pcap.Capture(lab, nodes, lab.run_dir / f"capture{'-' + prefix.rstrip('-') if prefix else ''}") as capture:
        report = audit()
    lost = {node: n for node, n in capture.stop().items() if n}
    if lost:
        console.note("safeq-lab: tcpdump's buffer overflowed (" + ", ".join(f"{n} packets on {node}" for node, n in
                                                                           lost.items()) + "): a pcap may miss packets")
    console.step(f"cutting one pcap per finding ({len(findings(report))} findings)")
    pcaps.append(pcap.write_finding_pcaps(capture, findings(report), lab.topology,
                                          report_dir / report_files.PCAP_DIR, prefix))
    return report


def _cmd_up(args) -> int:
    from emulator.lab import Lab, preflight

    preflight()
    _catalog, topology, checks = _plan(args.topology, _host_rules(args.rules, args.topology))
    rulesets = _rulesets(args.rules, topology, checks, args.certs)
    with Lab(topology, _catalog, certs_dir=args.certs) as lab:
        lab.apply_rules(rulesets)
        print("\n".join(_host_table(topology, lab.catalog)))
        print(f"safeq-lab: {topology.name} is up with rules from {_describe_rules(rulesets)}; run {lab.run_id}, "
              f"{len(topology.hosts)} hosts. `<host> <command>` runs in a host here; from another terminal: "
              f"`safeq-lab exec --run {lab.run_id} <host> -- <command>`. Type `exit` to tear it down.", flush=True)
        lab.console()
    return 0


MAX_SERVICES_LISTED = 6  # per host in `up`'s table (a site server serves about 50 ports)
# (protocol, security) -> URL scheme; security 'optional' (an in-band upgrade) keeps the plain scheme
_SCHEMES = {"http": ("http", "https"), "soap": ("http", "https"), "webdav": ("http", "https"),
            "ipp": ("ipp", "ipps"), "ldap": ("ldap", "ldaps"), "ftp": ("ftp", "ftps"), "smtp": ("smtp", "smtps"),
            "imap": ("imap", "imaps"), "pop3": ("pop", "pops"), "ssh": ("ssh", "ssh"), "snmp": ("snmp", "snmp"),
            "pgsql": ("postgresql", "postgresql"), "mssql": ("mssql", "mssql"), "smb": ("smb", "smb"),
            "raw": ("socket", "socket"), "lpr": ("lpd", "lpd")}


def _host_table(topology, catalog) -> list[str]:
    """One line per host (at most MAX_HOSTS_LISTED): name, address, roles, and how to reach a few of
    its services (a URL where the protocol has a scheme, else port/transport protocol)."""
    from emulator.plan import listeners_for

    hosts = topology.hosts
    lines = [f"{'host':12} {'address':15} roles; services"]
    for host in hosts[:MAX_HOSTS_LISTED]:
        listeners = sorted(listeners_for(catalog, host, topology.profile), key=lambda l: (l.port, l.transport))
        reachable = [l for l in listeners if not l.bind]  # not those bound to the host's loopback
        services = [_service(host.address, l) for l in reachable[:MAX_SERVICES_LISTED]]
        more = len(reachable) - len(services)
        lines.append(f"{host.name:12} {host.address:15} {', '.join(host.roles)}")
        if services:
            lines.append(f"{'':28} " + " ".join(services) + (f" (+{more} more)" if more > 0 else ""))
    if len(hosts) > MAX_HOSTS_LISTED:
        lines.append(f"... and {len(hosts) - MAX_HOSTS_LISTED} more hosts (last: {hosts[-1].name} {hosts[-1].address}); "
                     f"`safeq-lab topology --topology {topology.name}` lists them all")
    return lines


def _service(address: str, listener) -> str:
    schemes = _SCHEMES.get(listener.protocol)
    if schemes is None:
        return f"{listener.port}/{listener.transport}:{listener.protocol}"
    return f"{schemes[listener.security == 'tls']}://{address}:{listener.port}"


def _cmd_topology(args) -> int:
    from emulator.topology import load_topology

    topology = load_topology(args.topology)
    print(f"{topology.name}: {topology.description}  (firewall node: {topology.firewall})")
    for zone in topology.zones:
        print(f"  zone {zone.name} {zone.subnet} (firewall {zone.gateway} on {topology.firewall_interface(zone)})")
        for host in zone.hosts:
            print(f"    {host.name:10} {host.address:15} {', '.join(host.roles)}")
    return 0


def _cmd_clean(args) -> int:
    from emulator.state import clean

    removed = clean(force=args.force)
    print("safeq-lab: removed " + ", ".join(removed) if removed else "safeq-lab: nothing to clean")
    return 0


def _cmd_scenario(args) -> int:
    from emulator.scenario import command as scenario_command

    return scenario_command.run(args)


def _cmd_persona(args) -> int:
    from emulator import persona_import

    try:
        return persona_import.run(args)
    except persona_import.PersonaDataError as exc:
        raise LabError(str(exc)) from None


# -- exec: a command inside a host of a running lab ----------------------------------------------
def _cmd_exec(args) -> int:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise LabError(f"give the command to run after --: safeq-lab exec {args.host} -- COMMAND [ARG ...]")
    pid = _node_pid(args.host, args.run)
    sys.stdout.flush()
    try:  # the command replaces us: its terminal, output and exit status are the user's
        os.execvp("mnexec", ["mnexec", "-a", str(pid), *argv])
    except OSError as exc:
        raise LabError(f"cannot run mnexec: {exc.strerror or exc} (it comes with Mininet: run ./setup.sh)") from None


def _live_labs() -> list[dict]:
    from emulator import state

    return [owner for _path, owner in state.runs() if owner and owner.get("run") and state.owner_alive(owner)]


def _node_pid(node: str, run_id: str | None) -> int:
    """The pid of a process inside `node`'s network namespace, in the one live lab (or run `run_id`)."""
    labs = _live_labs()
    described = ", ".join(f"{o['run']} ({o.get('topology')})" for o in labs)
    if not labs:
        raise LabError("no lab is up: start one with `safeq-lab up` (e.g. in another terminal), then run exec")
    if run_id is not None:
        labs = [o for o in labs if o["run"] == run_id]
        if not labs:
            raise LabError(f"--run {run_id}: no lab with that id is up (up: {described}; `safeq-lab up` prints its id)")
    elif len(labs) > 1:
        raise LabError(f"{len(labs)} labs are up: {described}; pick one with --run ID (`safeq-lab up` prints its id)")
    owner = labs[0]
    if os.geteuid() != 0:
        raise LabError("exec enters a lab host's network namespace, which needs root: run it with sudo")
    nodes = _lab_nodes(owner)
    if node not in nodes:
        shown = ", ".join(sorted(nodes)[:MAX_HOSTS_LISTED]) + (" ..." if len(nodes) > MAX_HOSTS_LISTED else "")
        raise LabError(f"{node} is not a node of the lab {owner['run']} (topology {owner.get('topology')}, "
                       f"started by `safeq-lab up`); its nodes: {shown or 'none yet: it is still starting'}")
    return nodes[node]


def _lab_nodes(owner: dict) -> dict[str, int]:
    """node name -> pid of its Mininet shell, for the run's nodes that have a namespace of their own
    (hosts, firewall nodes, shapers; not the bridges, whose shells live in the host's namespace)."""
    from emulator import state

    own = os.stat("/proc/self/ns/net").st_ino
    nodes = {}
    for pid, what in state.lab_processes({str(Path(owner.get("run_dir", "")))}).items():
        if not what.startswith("shell "):
            continue
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino == own:
                continue
        except OSError:
            continue  # gone meanwhile
        nodes[what.split(" ", 1)[1]] = pid
    return nodes


# -- completion: a script generated from this parser (no dependency; argcomplete is not needed) ---
def _cmd_completion(args) -> int:
    sys.stdout.write(_completion_script(_build_parser(), args.shell))
    return 0


def _completion_script(parser: argparse.ArgumentParser, shell: str) -> str:
    """A bash function completing commands, actions, options and their values; zsh runs it through
    bashcompinit. Built from the argparse tree, so a new command or option is completed at once."""
    from emulator.topology import TOPOLOGIES_DIR

    topologies = " ".join(sorted(p.stem for p in TOPOLOGIES_DIR.glob("*.yaml")))
    moves, words, values = [], [], []

    def walk(p: argparse.ArgumentParser, path: str) -> None:
        offered = []
        files = False
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    offered.append(name)
                    moves.append(f'"{path}/{name}"')
                    walk(child, f"{path}_{name}".lstrip("_"))
            elif action.option_strings:
                offered += action.option_strings
                if action.nargs == 0:
                    continue
                keys = "|".join(f'"{path}/{o}"' for o in action.option_strings)
                if action.choices:
                    values.append(f'{keys}) COMPREPLY=($(compgen -W "{" ".join(action.choices)}" -- "$cur")); return ;;')
                elif action.dest == "topology":
                    values.append(f'{keys}) COMPREPLY=($(compgen -W "{topologies}" -f -- "$cur")); return ;;')
                else:
                    values.append(f'{keys}) COMPREPLY=($(compgen -f -- "$cur")); return ;;')
            elif action.choices:
                offered += list(action.choices)
            elif action.nargs != argparse.REMAINDER:
                files = True
        words.append(f'"{path}") words="{" ".join(offered)}"; files={int(files)} ;;')

    walk(parser, "")
    body = f"""_safeq_lab() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" prev="${{COMP_WORDS[COMP_CWORD-1]}}" path="" words="" files=0 i
    for ((i = 1; i < COMP_CWORD; i++)); do
        [ "${{COMP_WORDS[i]}}" = "--" ] && {{ COMPREPLY=($(compgen -c -- "$cur")); return; }}
        case "$path/${{COMP_WORDS[i]}}" in
            {"|".join(moves)}) path="${{path:+${{path}}_}}${{COMP_WORDS[i]}}" ;;
        esac
    done
    case "$path/$prev" in
        {(chr(10) + " " * 8).join(values)}
    esac
    case "$path" in
        {(chr(10) + " " * 8).join(words)}
    esac
    if [ "$files" = 1 ] && [ "${{cur#-}}" = "$cur" ]; then
        COMPREPLY=($(compgen -W "$words" -f -- "$cur"))
    else
        COMPREPLY=($(compgen -W "$words" -- "$cur"))
    fi
}}
complete -o filenames -F _safeq_lab safeq-lab
"""
    if shell == "zsh":
        return ("# zsh completion for safeq-lab: add `source <(safeq-lab completion zsh)` to ~/.zshrc "
                "(after compinit)\nautoload -U +X bashcompinit && bashcompinit\n" + body)
    return "# bash completion for safeq-lab: `source <(safeq-lab completion bash)`, e.g. in ~/.bashrc\n" + body


_COMMANDS = {"catalog": _cmd_catalog, "rules": _cmd_rules, "audit": _cmd_audit, "up": _cmd_up,
             "topology": _cmd_topology, "persona": _cmd_persona, "scenario": _cmd_scenario, "clean": _cmd_clean,
             "exec": _cmd_exec, "completion": _cmd_completion}

if __name__ == "__main__":
    sys.exit(main())
