"""Scenario files (loader and validator) and the runner, with a fake lab: no root, no Mininet."""
from __future__ import annotations

import io
import re
import threading
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from emulator.catalog import load_catalog
from emulator.errors import LabError
from emulator.impair import Impairment
from emulator.protocols.base import ProbeResult
from emulator.rules import Ruleset
from emulator.scenario import command, runner, schema
from emulator.scenario.runner import Runner
from emulator.scenario.schema import SCENARIOS_DIR, available_scenarios, load_scenario

CATALOG = load_catalog()

VALID = """\
name: tiny-scenario
description: A login, a fault, an expectation
topology: single-site
timeout: 1
impairable: [devices]
steps:
  - {id: login, do: "tp4 logs in at site1", flow: terminal-server-45, from: tp4, to: site1, options: {card: '1234'}}
  - {fault: stop, host: site1}
  - {expect: login, outcome: ok, says: "the baseline"}
"""


def write(tmp_path: Path, text: str, name: str = "scn.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path: Path) -> str:
    with pytest.raises(LabError) as caught:
        load_scenario(path, CATALOG)
    message = str(caught.value)
    assert "\n" not in message
    return message


# -- loading ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", available_scenarios())
def test_every_shipped_scenario_loads(name):
    scenario = load_scenario(name, CATALOG)
    assert scenario.name == name  # file name and scenario name agree, so `scenario run NAME` finds it
    assert scenario.description and "\n" not in scenario.description
    assert any(s for s in scenario.steps), name


def test_shipped_scenarios_cover_the_promised_failure_modes():
    names = set(available_scenarios())
    assert {"role-down-vs-firewall-drop", "passive-ftp-blocked", "time-sync-blocked", "ldap-unencrypted",
            "database-open-to-users", "scg-latency-over-wan"} <= names
    for name in names - set(vendor_scenarios()) - set(workflow_stories()):  # stories show workflows working
        assert load_scenario(name, CATALOG).repair, f"{name} has no repair section"


def test_a_valid_file_gives_typed_steps(tmp_path):
    scenario = load_scenario(write(tmp_path, VALID), CATALOG)
    login, stop, expect = scenario.steps
    assert (login.flow.id, login.client, login.server, login.options, login.timeout) == \
        ("terminal-server-45", "tp4", "site1", {"card": "1234"}, 1.0)
    assert [ep.protocol for ep in login.endpoints] == ["terminal"]
    assert (stop.kind, stop.host, stop.number) == ("stop", "site1", "2")
    assert (expect.target, expect.outcome, expect.says) == ("login", "ok", "the baseline")
    assert scenario.rules == {"fw": "generated"}


# (replace this, with that, in VALID) -> line, key, words of the message
BAD = [
    ("name: tiny-scenario", "name: Tiny Scenario", 1, "name", "lowercase"),
    ("timeout: 1\n", "timeout: 1\ncolour: blue\n", 5, "colour", "unknown key 'colour'"),
    ("topology: single-site", "topology: nowhere", 3, "topology", "unknown topology 'nowhere'"),
    ("timeout: 1\n", "timeout: 900\n", 4, "timeout", "out of range"),
    ("{fault: stop, host: site1}", "{fault: dely, link: devices, ms: 5}", 8, "steps[1].fault",
     "unknown fault 'dely'; use one of delay"),
    ("{fault: stop, host: site1}", "{fault: stop, host: site9}", 8, "steps[1].host", "no host 'site9'"),
    ("{fault: stop, host: site1}", "{fault: stop}", 8, "steps[1]", "missing key 'host'"),
    ("{fault: stop, host: site1}", "{fault: delay, link: wan, ms: 5}", 8, "steps[1].link",
     "link 'wan' is not impairable in this scenario (impairable: devices)"),
    ("{fault: stop, host: site1}", "{fault: loss, link: devices, percent: 500}", 8, "steps[1].percent", "out of range"),
    ("{fault: stop, host: site1}", "{fault: rule, node: fw, rule: \"-F\"}", 8, "steps[1].rule", "-I CHAIN"),
    ("{fault: stop, host: site1}", "{fault: rule, node: fw, rule: \"-I FORWARD -s {nowhere} -j DROP\"}", 8,
     "steps[1].rule", "{nowhere} names no host or zone"),
    ("{fault: stop, host: site1}", "{fault: rule, node: fw, rule: \"-I FORWARD -d 8.8.8.8 -j DROP\"}", 8,
     "steps[1].rule", "outside the lab"),
    ("{fault: stop, host: site1}", "{fault: rule, node: pc1, rule: \"-I FORWARD -j DROP\"}", 8,
     "steps[1].node", "holds no ruleset"),
    ("{fault: stop, host: site1}", "{fault: block, flow: terminal-server-45, from: tp4, to: site1, action: deny}", 8,
     "steps[1].action", "unknown action 'deny'"),
    ("{fault: stop, host: site1}", "{fault: block, flow: terminal-server-45, from: tp4, to: tp35}", 8,
     "steps[1].to", "no firewall stands between"),
    ("flow: terminal-server-45, from", "flow: terminal-server-99, from", 7, "steps[0].flow",
     "no catalog flow 'terminal-server-99'"),
    ("from: tp4, to: site1", "from: tp4, to: db1", 7, "steps[0].to", "db1 does not run terminal-server"),
    ("from: tp4, to: site1", "from: tp9, to: site1", 7, "steps[0].from", "no host 'tp9'"),
    ("from: tp4, to: site1", "from: site1, to: site1", 7, "steps[0].to", "one host"),
    ("options: {card: '1234'}", "options: {card: '1234'}, security: tls", 7, "steps[0].security",
     "no security 'tls'"),
    ("options: {card: '1234'}", "options: {card: '1234'}, mode: passive", 7, "steps[0].mode", "FTP"),
    ("options: {card: '1234'}", "options: [card]", 7, "steps[0].options", "mapping of probe options"),
    ("{id: login, do", "{id: Login!, do", 7, "steps[0].id", "short lowercase word"),
    ("{expect: login, outcome: ok", "{expect: logon, outcome: ok", 9, "steps[2].expect",
     "'logon' is not the id of an earlier workflow step (login)"),
    ("{expect: login, outcome: ok", "{expect: login, outcome: fine", 9, "steps[2].outcome", "unknown outcome 'fine'"),
    ("{expect: login, outcome: ok", "{expect: login, elapsed_ms: {above: 50, below: 10}", 9, "steps[2].elapsed_ms",
     "cannot both hold"),
    ("{expect: login, outcome: ok, says: \"the baseline\"}", "{expect: login}", 9, "steps[2]",
     "needs outcome:, elapsed_ms: or round_trip_ms:"),
    ("{expect: login, outcome: ok", "{expect: login, round_trip_ms: {below: 100}", 9, "steps[2].round_trip_ms",
     "measures no round trip: give it options: {rounds: N}"),
    ("{expect: login, outcome: ok", "{expect: login, round_trip_ms: {above: 100, below: 90}", 9,
     "steps[2].round_trip_ms", "cannot both hold"),
    ("options: {card: '1234'}", "options: {card: '1234'}, size: 4 GB", 7, "steps[0].size", "a size like 16 MB"),
    ("options: {card: '1234'}", "options: {card: '1234'}, size: 65 MiB", 7, "steps[0].size", "out of range"),
    ("options: {card: '1234'}", "options: {card: '1234'}, size: -1", 7, "steps[0].size", "out of range"),
    ("{expect: login, outcome: ok, says: \"the baseline\"}", "{table: [login], mbit: 10}", 9, "steps[2].table[0]",
     "has no size"),
    ("{expect: login, outcome: ok, says: \"the baseline\"}", "{table: [logon], mbit: 10}", 9, "steps[2].table[0]",
     "not the id of an earlier workflow"),
    ("{expect: login, outcome: ok, says: \"the baseline\"}", "{table: login, mbit: 10}", 9, "steps[2].table",
     "list of earlier workflow ids"),
    ("{expect: login, outcome: ok, says: \"the baseline\"}", "{table: [login]}", 9, "steps[2]", "missing key 'mbit'"),
    ("  - {fault: stop, host: site1}\n", "  - {fault: stop, host: site1}\n  - {id: login, do: again, "
     "flow: terminal-server-45, from: tp4, to: site1}\n", 9, "steps[2].id", "already used"),
    ("  - {fault: stop, host: site1}\n", "  - {fault: stop, host: site1, flow: x, expect: login}\n", 8, "steps[1]",
     "this one has fault, expect"),
    ("  - {fault: stop, host: site1}\n", "  - parallel: [{fault: stop, host: site1}]\n", 8, "steps[1].parallel",
     "at least two steps"),
    ("  - {fault: stop, host: site1}\n", "  - parallel: [{fault: stop, host: site1}, {expect: login, outcome: ok}]\n",
     8, "steps[1].parallel[1].expect", "not inside it"),
    ("  - {fault: stop, host: site1}\n", "  - parallel: [{fault: stop, host: site1}, "
     "{parallel: [{fault: stop, host: site2}, {fault: stop, host: pc1}]}]\n", 8, "steps[1].parallel[1].parallel",
     "cannot hold another group"),
    ("  - {fault: stop, host: site1}\n", "  - 42\n", 8, "steps[1]", "expected a step"),
    ("impairable: [devices]", "impairable: devices", 5, "impairable", "list of link names"),
    ("impairable: [devices]", "rules: {fw: missing.rules}", 5, "rules.fw", "does not exist"),
    ("impairable: [devices]", "rules: {db1: generated}", 5, "rules.db1", "holds no ruleset"),
    ("timeout: 1\n", "timeout: 1\ntimeout: 2\n", 5, "file", "given twice"),
    ("timeout: 1\n", "timeout: &t 1\n", 4, "file", "anchors and aliases are not allowed"),
    ("timeout: 1\n", "timeout: [1\n", 5, "file", "not valid YAML"),
    ("steps:\n", "stepz:\n", 6, "stepz", "unknown key 'stepz'"),
    ("{fault: stop, host: site1}", "{fault: certificate, host: site1, kind: stale}", 8, "steps[1].kind",
     "unknown certificate kind 'stale'; use one of expired, pre-installed, valid"),
    ("{fault: stop, host: site1}", "{fault: certificate, host: site1}", 8, "steps[1]", "missing key 'kind'"),
    ("{fault: stop, host: site1}", "{fault: certificate, host: site9, kind: expired}", 8, "steps[1].host",
     "no host 'site9'"),
    ("outcome: ok, says", "outcome: ok, detail: 7, says", 9, "steps[2].detail", "expected words"),
]


@pytest.mark.parametrize("old,new,line,key,words", BAD, ids=[f"{b[3]}:{b[4][:24]}" for b in BAD])
def test_every_error_names_file_line_and_key(tmp_path, old, new, line, key, words):
    assert old in VALID
    path = write(tmp_path, VALID.replace(old, new, 1))
    message = error_of(path)
    assert message.startswith(f"{path}:{line}: {key}: "), message
    assert words in message, message


def test_missing_key_and_empty_file_and_not_utf8(tmp_path):
    assert error_of(write(tmp_path, "[1]", "a.yaml")).endswith("a.yaml:1: file: expected a mapping (key: value lines), got a list")
    assert ": file: missing key 'steps'" in error_of(write(tmp_path, VALID.split("steps:")[0], "b.yaml"))
    assert ":1: file: the file is empty" in error_of(write(tmp_path, "", "c.yaml"))
    (tmp_path / "d.yaml").write_bytes(b"name: x\ndescription: \xff\n")
    assert ":2: file: byte 0xff is not UTF-8" in error_of(tmp_path / "d.yaml")


def test_an_unknown_scenario_name_lists_the_known_ones():
    with pytest.raises(LabError, match="unknown scenario 'nope': use one of .*time-sync-blocked"):
        load_scenario("nope", CATALOG)


# -- a fake lab ---------------------------------------------------------------------------------
class FakeLab:
    """A lab in miniature: probes succeed unless their server's daemon was stopped (refused), an
    iptables DROP/REJECT names their server and port (timeout/refused) or their link is delayed.
    A probe that carries a document and succeeds hands it, whole, to its server's host."""

    ca_file = "/lab/ca.pem"

    def __init__(self, topology=None, catalog=None, **options):
        self.topology, self.options = topology, options
        self.events: list[tuple] = []
        self.stopped: set[str] = set()
        self.blocked: dict[tuple[str, int], str] = {}
        self.delay_ms = 0.0
        self.mbit = 0.0
        self.helpers = ["-A PREROUTING -d 198.18.2.18/32 -p tcp -m tcp --dport 21 -m comment --comment "
                        "\"ftp data channels via conntrack helper\" -j CT --helper ftp"]
        self.barrier: threading.Barrier | None = None
        self.entered = self.exited = 0
        self.holders: dict[str, set[str]] = {}   # document -> the hosts it reached (or was created on)
        self.certificates: dict[str, str] = {}   # server address -> the kind of certificate its TLS ports present

    def __enter__(self):
        self.events.append(("enter", self.options))
        return self

    def __exit__(self, *exc):
        self.events.append(("exit",))

    def apply_rules(self, rulesets):
        self.events.append(("apply_rules", tuple(rulesets)))
        self.applied = dict(rulesets)
        self.blocked.clear()

    def stop_daemon(self, host):
        self.events.append(("stop", host))
        self.stopped.add(self.topology.host(host).address)

    def start_daemon(self, host):
        self.events.append(("start", host))
        self.stopped.discard(self.topology.host(host).address)

    def install_certificate(self, host, kind):
        self.events.append(("certificate", host, kind))
        self.certificates[self.topology.host(host).address] = kind
        return f"{host} presents a {kind} certificate"

    def impair(self, link, impairment):
        self.events.append(("impair", link, impairment))
        self.delay_ms = impairment.delay_ms or 0.0
        self.mbit = impairment.bw or 0.0
        return f"netem on {link}"

    def clear_impairment(self, link):
        self.events.append(("clear", link))
        self.delay_ms = self.mbit = 0.0
        return f"{link} passes everything again"

    def command(self, node, argv):
        self.events.append(("command", node, tuple(argv)))
        if argv[:3] == ["iptables-save", "-t", "raw"]:
            return "*raw\n" + "\n".join(self.helpers) + "\nCOMMIT\n"
        if "-j" in argv and argv[argv.index("-j") + 1] in ("DROP", "REJECT"):
            dst = argv[argv.index("-d") + 1].split("/")[0]
            self.blocked[(dst, int(argv[argv.index("--dport") + 1]))] = argv[argv.index("-j") + 1]
        return ""

    def node(self, name):
        return SimpleNamespace(popen=lambda argv, **_kw: FakeProc(self.command(name, argv)))

    def run_probes(self, targets_by_host):
        self.entered += 1
        if self.barrier is not None:
            self.barrier.wait()  # a parallel group: every member must be in flight at once
        self.events.append(("probe", tuple((h, t.host, t.port, t.timeout, t.ca_file, tuple(sorted(t.options.items())))
                                           for h, ts in targets_by_host.items() for t in ts)))
        self.sizes = [t.size for ts in targets_by_host.values() for t in ts]
        results = {}
        for ts in targets_by_host.values():
            for t in ts:
                if t.host in self.stopped:
                    results[t.id] = ProbeResult(t.id, "refused", 0.001, exchange="terminal session")
                elif self.blocked.get((t.host, t.port)) == "DROP":
                    results[t.id] = ProbeResult(t.id, "timeout", t.timeout, detail="no TCP connection")
                elif self.blocked.get((t.host, t.port)) == "REJECT":
                    results[t.id] = ProbeResult(t.id, "refused", 0.001)
                elif self.certificates.get(t.host, "valid") != "valid" and t.security != "plain":
                    results[t.id] = ProbeResult(t.id, "protocol_error", 0.002, exchange="SOAP 1.1/HTTPS",
                                                detail=f"certificate: certificate verify failed: "
                                                       f"{self.certificates[t.host]} certificate")
                else:
                    # a link's delay once per round trip, its rate once per payload
                    transfer = t.size * 8 / (self.mbit * 1e6) if self.mbit else 0.0
                    rounds = t.options.get("rounds")
                    results[t.id] = ProbeResult(t.id, "ok", 0.010 + self.delay_ms / 1000 + transfer,
                                                exchange="login → session",
                                                round_trip_ms=0.5 + self.delay_ms if rounds else None)
                    if "carries" in t.options:
                        server = next(h.name for h in self.topology.hosts if h.address == t.host)
                        # the first hop creates the document where it runs; every hop hands it to its server
                        self.holders.setdefault(t.options["carries"], {t.options["holder"]}).add(server)
        return results

    def documents(self, host, name=""):
        from emulator.protocols.jobstore import KINDS, Document
        if host not in self.holders.get(name, ()):
            return []
        return [Document(name, kind, 1000, "f" * 64, metadata_bytes=50_000) for kind in KINDS]


class FakeProc:
    def __init__(self, out):
        self.out, self.returncode = out, 0

    def communicate(self, timeout=None):
        return self.out, ""


RULESETS = {"fw": Ruleset("iptables", "*filter\nCOMMIT\n", "generated")}


def run(tmp_path, text, lab=None, pause=None):
    scenario = load_scenario(write(tmp_path, text), CATALOG)
    lab = lab or FakeLab(scenario.topology)
    lab.topology = scenario.topology
    out = io.StringIO()
    result = Runner(scenario, lab, RULESETS, out, pause=pause).run()
    return result, out.getvalue(), lab


# -- running ------------------------------------------------------------------------------------
ROLE_DOWN = """\
name: role-down
description: refused when down, timeout when dropped
topology: single-site
timeout: 2
steps:
  - {id: a, do: "tp4 logs in at site1", flow: terminal-server-45, from: tp4, to: site1, options: {card: '1234'}}
  - {fault: stop, host: site1}
  - {id: b, do: "tp4 logs in at site1 again", flow: terminal-server-45, from: tp4, to: site1}
  - {expect: b, outcome: refused, says: "nothing listens"}
  - {fault: block, flow: terminal-server-45, from: tp4, to: site2}
  - {id: c, do: "tp4 logs in at site2", flow: terminal-server-45, from: tp4, to: site2}
  - {expect: c, outcome: timeout}
  - {expect: c, outcome: ok, says: "this one is meant to fail"}
repair:
  - {fault: reset-rules}
  - {id: d, do: "tp4 logs in at site2 again", flow: terminal-server-45, from: tp4, to: site2}
  - {expect: d, outcome: ok}
"""


def test_steps_run_in_order_and_expectations_are_judged(tmp_path):
    result, out, lab = run(tmp_path, ROLE_DOWN)
    kinds = [e[0] for e in lab.events]
    assert kinds == ["probe", "stop", "probe", "command", "probe", "apply_rules", "probe"]
    assert [(e.number, e.held) for e in result.expectations] == [("4", True), ("7", True), ("8", False), ("11", True)]
    assert not result.passed and result.exit_status == 1
    # the first probe carries the step's options, the scenario's timeout and the lab's CA
    (host, address, port, timeout, ca_file, options), = lab.events[0][1]
    assert (host, address, timeout, ca_file, dict(options)["card"]) == ("tp4", "198.18.1.10", 2.0, "/lab/ca.pem", "1234")
    block = lab.events[3]
    assert block[1] == "fw" and block[2][:8] == ("iptables", "-I", "FORWARD", "-s", "198.18.2.25/32", "-d",
                                                 "198.18.1.11/32", "-p")
    assert block[2][-2:] == ("-j", "DROP") and str(port) in block[2]
    assert lab.events[5] == ("apply_rules", ("fw",))
    assert "Step 2: the role daemon on site1 stops" in out
    assert "Step 3: tp4 logs in at site1 again (terminal-server-45, tp4 -> site1" in out
    assert "  -> failed after 0.0 s: refused" in out
    assert "  -> DOES NOT HOLD: no answer (timeout) after 2.0 s. this one is meant to fail" in out
    assert "Repair:\nStep 9: every firewall gets the scenario's rules back" in out
    assert "Scenario role-down: 3 of 4 expectations hold - FAILED" in out
    assert re.search(r"FAIL  step 8 +tp4 logs in at site2: to work", out)


def test_all_expectations_holding_exit_zero(tmp_path):
    text = ROLE_DOWN.replace('  - {expect: c, outcome: ok, says: "this one is meant to fail"}\n', "")
    result, out, _lab = run(tmp_path, text)
    assert result.passed and result.exit_status == 0
    assert "3 of 3 expectations hold\n" in out


def test_a_parallel_group_runs_its_members_at_once(tmp_path):
    text = VALID.replace("  - {id: login,", "  - parallel:\n    - {id: other, do: \"tp4 logs in at site2\", "
                         "flow: terminal-server-45, from: tp4, to: site2}\n    - {id: login,")
    lab = FakeLab()
    lab.barrier = threading.Barrier(2, timeout=5)  # breaks (an exception) if the members ran one after the other
    result, out, lab = run(tmp_path, text, lab)
    assert lab.entered == 2 and result.passed
    assert "Step 1: at the same time:\n  1.1: tp4 logs in at site2" in out
    assert "  1.2 -> it worked in 0.01 s: login → session" in out
    assert "Step 3: expect step 1.2 (tp4 logs in at site1) to work" in out


def test_a_workflow_with_two_endpoints_fails_when_one_fails(tmp_path):
    text = VALID.replace("flow: terminal-server-45, from: tp4, to: site1, options: {card: '1234'}",
                         "flow: ldap-04, from: mgmt1, to: dir").replace("{fault: stop, host: site1}",
                                                                        "{fault: block, flow: ldap-04, from: mgmt1, "
                                                                        "to: dir, security: plain, action: reject}")
    text += "  - {id: again, do: \"mgmt1 looks up users\", flow: ldap-04, from: mgmt1, to: dir}\n" \
            "  - {expect: again, outcome: refused}\n"
    result, out, lab = run(tmp_path, text)
    assert result.passed
    block = [e for e in lab.events if e[0] == "command"][0][2]
    assert block[-4:] == ("-j", "REJECT", "--reject-with", "tcp-reset")
    assert re.search(r"389/tcp ldap: failed after .* refused", out) and "636/tcp ldap+tls: it worked" in out


def test_ftp_helper_off_deletes_the_helper_rules_it_finds(tmp_path):
    text = VALID.replace("{fault: stop, host: site1}", "{fault: ftp-helper-off, node: fw}")
    _result, out, lab = run(tmp_path, text)
    commands = [e[2] for e in lab.events if e[0] == "command"]
    assert commands[0] == ("iptables-save", "-t", "raw")
    assert commands[1][:5] == ("iptables", "-t", "raw", "-D", "PREROUTING")
    assert commands[1][-4:] == ("-j", "CT", "--helper", "ftp")
    assert "ftp data channels via conntrack helper" in commands[1]  # one word, as iptables reads it
    assert "-> 1 conntrack helper rule removed on fw" in out


def test_nft_helper_rules_are_found_by_handle():
    listing = ("table inet safeq_lab { # handle 3\n  chain pre { # handle 1\n"
               "    ip daddr 198.18.2.18 tcp dport 21 ct helper set \"ftp_helper\" comment \"x\" # handle 7\n"
               "    ip daddr 198.18.2.19 accept # handle 8\n  }\n}\n")
    assert runner._nft_helper_rules(listing) == [("inet", "safeq_lab", "pre", "7")]


def test_link_faults_go_through_the_impairment_api(tmp_path):
    text = VALID.replace("{fault: stop, host: site1}", "{fault: delay, link: devices, ms: 150, jitter_ms: 5}")
    text = text.replace("{expect: login, outcome: ok, says: \"the baseline\"}",
                        "{id: slow, do: \"tp4 logs in slowly\", flow: terminal-server-45, from: tp4, to: site1}\n"
                        "  - {expect: slow, outcome: ok, elapsed_ms: {above: 150}}\n"
                        "  - {fault: cut, link: devices}\n  - {fault: clear, link: devices}\n"
                        "  - {fault: loss, link: devices, percent: 5}\n  - {fault: bandwidth, link: devices, mbit: 2}")
    result, out, lab = run(tmp_path, text)
    assert result.passed
    impairs = [e[2] for e in lab.events if e[0] == "impair"]
    assert impairs == [Impairment(delay_ms=150, jitter_ms=5), Impairment(loss=100), Impairment(loss=5), Impairment(bw=2)]
    assert ("clear", "devices") in lab.events
    assert "Step 2: the devices link gets 150 ms more round-trip time (jitter 5 ms)\n  -> netem on devices" in out
    assert "to work, taking more than 150 ms" in out


def test_step_mode_waits_for_enter_before_each_step(tmp_path):
    stdin, out = io.StringIO("\n\n"), io.StringIO()
    pause = command.enter_pause(stdin, out)
    seen = []

    def recording(label):
        seen.append((label, stdin.tell()))
        pause(label)

    run(tmp_path, VALID, pause=recording)
    assert [label for label, _ in seen] == ["Step 1", "Step 2", "Step 3"]
    assert [pos for _, pos in seen] == [0, 1, 2]  # each step read one more line before it ran
    assert out.getvalue() == ("[Enter] Step 1 [Enter] Step 2 [Enter] Step 3 "
                              "(end of input: the remaining steps run without pausing)\n")


# -- the command ----------------------------------------------------------------------------------
def test_run_file_builds_nothing_for_an_invalid_file(tmp_path):
    built = []
    path = write(tmp_path, VALID.replace("host: site1}", "host: nowhere}"))
    with pytest.raises(LabError, match=r"scn.yaml:8: steps\[1\].host"):
        command.run_file(str(path), io.StringIO(), lab_class=lambda *a, **k: built.append(a))
    assert built == []


def test_run_file_runs_a_shipped_scenario_in_a_fake_lab():
    labs = []

    def make(topology, catalog, **options):
        labs.append(FakeLab(topology, catalog, **options))
        return labs[-1]

    out = io.StringIO()
    assert command.run_file("role-down-vs-firewall-drop", out, lab_class=make) == 0
    lab, = labs
    assert lab.events[0] == ("enter", {}) and lab.events[-1] == ("exit",)
    assert lab.events[1] == ("apply_rules", ("fw",))
    assert "Scenario role-down-vs-firewall-drop: 6 of 6 expectations hold" in out.getvalue()


def test_run_file_asks_the_lab_for_the_impairable_links():
    labs = []

    def make(topology, catalog, **options):
        labs.append(FakeLab(topology, catalog, **options))
        return labs[-1]

    assert command.run_file("scg-latency-over-wan", io.StringIO(), lab_class=make) == 0
    assert labs[0].events[0] == ("enter", {"impairable": ["wan-bfw"]})


def test_scenario_list_names_every_file(tmp_path):
    out = io.StringIO()
    assert command.run(SimpleNamespace(scenario_command="list"), out) == 0
    lines = out.getvalue().splitlines()
    assert len(lines) == len(list(SCENARIOS_DIR.glob("*.yaml")))
    assert any(line.startswith("scg-latency-over-wan") and "[needs link impairments]" in line for line in lines)
    assert not any("invalid" in line for line in lines)


# -- vendor stories (scenarios/vendor-*.yaml) -----------------------------------------------------
VENDOR_PREFIX = "vendor-"


def vendor_scenarios() -> list[str]:
    return [name for name in available_scenarios() if name.startswith(VENDOR_PREFIX)]


def mfd_and_terminal_roles() -> set[str]:
    """Every MFD family and terminal of the catalog (kinds device and terminal) with a flow the lab can run."""
    runnable = {role for flow in CATALOG.flows if flow.exercisable for role in (flow.client, flow.server)}
    return {role.id for role in CATALOG.roles.values() if role.kind in ("device", "terminal") and role.id in runnable}


def test_every_mfd_family_and_terminal_has_a_vendor_story():
    covered = {role for name in vendor_scenarios()
               for workflow in load_scenario(name, CATALOG).workflows().values()
               for role in (workflow.flow.client, workflow.flow.server)}
    roles = mfd_and_terminal_roles()
    assert len(roles) > 30  # the catalog's vendor families, not an empty list passing by accident
    assert sorted(roles - covered) == []


@pytest.mark.parametrize("name", vendor_scenarios())
def test_a_vendor_story_expects_each_workflow_to_work(name):
    """Workflows only (no faults, no repair), each followed by an expectation that it works, on the
    default single-site lab with generated rules: so every vendor story can share one lab."""
    scenario = load_scenario(name, CATALOG)
    assert scenario.topology.name == "single-site" and set(scenario.rules.values()) == {"generated"}
    assert not scenario.repair and not scenario.impairable
    members = [m for step in scenario.steps for m in (step.steps if isinstance(step, schema.Parallel) else (step,))]
    assert not [m for m in members if isinstance(m, schema.Fault)]
    expected_ok = {m.target for m in members if isinstance(m, schema.Expect) and m.outcome == "ok"}
    assert expected_ok == set(scenario.workflows())


def test_vendor_stories_run_green_in_a_fake_lab():
    for name in vendor_scenarios():
        out = io.StringIO()
        assert command.run_file(name, out, lab_class=FakeLab) == 0, out.getvalue()
        assert " - FAILED" not in out.getvalue()


# -- round trips, sizes and tables -----------------------------------------------------------------
LATENCY = """\
name: latency
description: the sync round trip against a bound
topology: branch-office
impairable: [wan-bfw]
steps:
  - {id: fast, do: "site3 syncs", flow: spooler-controller-01, from: site3, to: site1, options: {rounds: 5}}
  - {expect: fast, outcome: ok, round_trip_ms: {below: 100}}
  - {fault: delay, link: wan-bfw, ms: 150}
  - {id: slow, do: "site3 syncs again", flow: spooler-controller-01, from: site3, to: site1, options: {rounds: 5}}
  - {expect: slow, round_trip_ms: {below: 100}, says: "beyond the bound"}
  - {expect: slow, outcome: ok, round_trip_ms: {above: 100}}
repair:
  - {fault: clear, link: wan-bfw}
"""


def test_round_trip_expectations_judge_the_measured_median(tmp_path):
    result, out, lab = run(tmp_path, LATENCY)
    assert [(e.number, e.held) for e in result.expectations] == [("2", True), ("5", False), ("6", True)]
    assert dict(lab.events[0][1][0][5])["rounds"] == 5   # the option reaches the probe
    assert result.workflows["fast"].round_trip_ms == 0.5 and result.workflows["slow"].round_trip_ms == 150.5
    assert "Step 2: expect step 1 (site3 syncs) to work, a round trip under 100 ms" in out
    assert "  -> DOES NOT HOLD: it worked in 160 ms; round trip 150.5 ms. beyond the bound" in out
    assert re.search(r"PASS  step 6 +site3 syncs again: to work, a round trip over 100 ms  \[.*round trip 150.5 ms\]", out)


def test_a_round_trip_expectation_fails_when_nothing_was_measured(tmp_path):
    class NoRoundTrips(FakeLab):
        def run_probes(self, targets_by_host):
            return {i: replace(r, round_trip_ms=None) for i, r in super().run_probes(targets_by_host).items()}

    result, out, _lab = run(tmp_path, LATENCY, NoRoundTrips())
    assert result.expectations[0].held is False and "no round trip measured" in result.expectations[0].observed


@pytest.mark.parametrize("text, size", [("4096", 4096), ("1 MB", 10 ** 6), ("16MiB", 16 * 2 ** 20), ("1.5 KB", 1500),
                                        ("0", 0), ("64 MiB", 64 * 2 ** 20)])
def test_workflow_sizes_take_units(tmp_path, text, size):
    scenario = load_scenario(write(tmp_path, VALID.replace("options: {card: '1234'}", f"size: {text}")), CATALOG)
    assert scenario.steps[0].size == size


BANDWIDTH = """\
name: bandwidth
description: delivery times on a narrow link
topology: single-site
impairable: [devices]
timeout: 10
steps:
  - {fault: bandwidth, link: devices, mbit: 20}
  - {id: small, do: "a 1 MB job", flow: mfd-23, from: site1, to: mfd-km, protocol: raw, size: 1 MB}
  - {id: big, do: "a 16 MB job", flow: mfd-23, from: site1, to: mfd-km, protocol: raw, size: 16 MB}
  - {id: mid, do: "a 4 MB job", flow: mfd-23, from: site1, to: mfd-km, protocol: raw, size: 4 MB}
  - {table: [small, mid, big], mbit: 20, within: 20%, says: "size over rate"}
repair:
  - {fault: clear, link: devices}
"""


def test_a_table_prints_delivery_times_and_judges_them_against_the_rate(tmp_path):
    result, out, lab = run(tmp_path, BANDWIDTH)
    assert result.passed, out
    probes = [e for e in lab.events if e[0] == "probe"]
    assert len(probes) == 3
    assert re.search(r"Step 3: a 16 MB job \(mfd-23, site1 -> mfd-km, \d+/tcp raw, 16 MB\)\n  -> it worked in 6.41 s", out)
    lines = out.split("Step 5: delivery times at 20 Mbit/s (predicted: size x 8 / rate)\n", 1)[1].splitlines()
    assert lines[0].split() == ["step", "size", "seconds", "Mbit/s", "predicted", "s", "outcome"]
    assert lines[1].split() == ["small", "1", "MB", "0.41", "19.51", "0.40", "ok"]
    assert lines[2].split() == ["mid", "4", "MB", "1.61", "19.88", "1.60", "ok"]
    assert lines[3].split() == ["big", "16", "MB", "6.41", "19.97", "6.40", "ok"]
    assert lines[4] == "  size over rate"
    judged = result.expectations
    assert [e.number for e in judged] == ["5"] * 4 and all(e.held for e in judged)
    assert judged[0].wording == "a 1 MB job: 1 MB delivered in 0.40 s +/- 20 %"
    assert re.fullmatch(r"0.41 s, \+[23] % \(19.51 Mbit/s\)", judged[0].observed)
    assert judged[3].wording == "the delivery time grows with the job's size"
    assert judged[3].observed == "1 MB: 0.41 s, 4 MB: 1.61 s, 16 MB: 6.41 s"


def test_a_table_fails_rows_off_the_prediction_and_times_that_do_not_grow(tmp_path):
    class Flat(FakeLab):   # every job takes as long: a link that is not the bottleneck
        def run_probes(self, targets_by_host):
            return {i: replace(r, elapsed=1.0) for i, r in super().run_probes(targets_by_host).items()}

    result, out, _lab = run(tmp_path, BANDWIDTH, Flat())
    assert [e.held for e in result.expectations] == [False, False, False, False]
    assert result.expectations[0].observed == "1.00 s, +150 % (8.00 Mbit/s)"
    assert "FAIL  step 5     the delivery time grows with the job's size" in out


def test_a_table_without_within_only_prints(tmp_path):
    result, out, _lab = run(tmp_path, BANDWIDTH.replace(", within: 20%", ""))
    assert result.expectations == [] and "delivery times at 20 Mbit/s" in out


@pytest.mark.parametrize("old, new, key, words", [
    ("within: 20%", "within: lots", "steps[4].within", "percent, like 20%"),
    ("within: 20%", "within: 0%", "steps[4].within", "out of range"),
    ("mbit: 20, within", "mbit: 0, within", "steps[4].mbit", "out of range"),
    ("[small, mid, big]", "[small, small]", "steps[4].table", "listed twice"),
    ("to: mfd-km, protocol: raw, size: 1 MB", "to: mfd-km, size: 1 MB", "steps[4].table[0]", "runs 2 deliveries at once"),
    ("  - {table:", "  - parallel: [{fault: clear, link: devices}, {table: [small], mbit: 1}]\n  - {table:",
     "steps[4].parallel[1].table", "not inside a group"),
])
def test_table_errors_name_the_key(tmp_path, old, new, key, words):
    assert old in BANDWIDTH
    message = error_of(write(tmp_path, BANDWIDTH.replace(old, new, 1)))
    assert f": {key}: " in message and words in message, message


def test_generated_rules_replace_a_scenarios_own_ruleset(tmp_path):
    result, out, lab = run(tmp_path, VALID.replace("{fault: stop, host: site1}", "{fault: generated-rules, node: fw}"))
    assert result.passed
    ruleset = lab.applied["fw"]
    assert "--ctstate RELATED,ESTABLISHED -j ACCEPT" in ruleset.text and "generated" in ruleset.source
    assert "Step 2: firewall fw gets the generated rules\n  -> fw: the ruleset generated from the catalog" in out


def test_generated_rules_are_for_firewall_nodes(tmp_path):
    message = error_of(write(tmp_path, VALID.replace("{fault: stop, host: site1}", "{fault: generated-rules, node: pc1}")))
    assert "steps[1].node" in message


def test_the_stateless_scenario_starts_from_its_own_rules_file():
    scenario = load_scenario("replies-dropped-stateless", CATALOG)
    ruleset = command.scenario_rulesets(scenario)["fw"]
    assert "ESTABLISHED" not in ruleset.text.split("*filter", 1)[1].split("COMMIT")[0].replace(
        "# ", "")   # the file says what it lacks only in its comment header
    assert [s.kind for s in scenario.repair if isinstance(s, schema.Fault)] == ["generated-rules"]


def test_the_jmx_scenario_runs_a_site_before_mu38():
    scenario = load_scenario("jmx-beyond-localhost", CATALOG)
    assert scenario.topology.profile.jmx_remote
    assert {w.flow.endpoints[0].protocol for w in scenario.workflows().values()} == {"jmx"}


# -- documents passed along (carries:, holds:) ---------------------------------------------------
WORKFLOW_SUFFIX = "-workflow"


def workflow_stories() -> list[str]:
    return [name for name in available_scenarios() if name.endswith(WORKFLOW_SUFFIX)]


CARRY = """\
name: carry
description: a job passed along
topology: single-site
steps:
  - {id: submit, do: "alice prints", flow: flexi-spooler-03, from: pc1, to: site1, carries: job-1, options: {user: alice}}
  - {id: release, do: "FlexiSpooler releases it", flow: mfd-23, from: site1, to: mfd-km, protocol: raw, carries: job-1}
  - {holds: job-1, at: mfd-km, in: print-job, says: "the same bytes"}
  - {holds: job-1, at: site2, in: accounting, metadata_kb: {above: 40, below: 60}}
"""


def test_carries_becomes_probe_options_and_holds_names_its_origin(tmp_path):
    scenario = load_scenario(write(tmp_path, CARRY), CATALOG)
    submit, release, held, accounted = scenario.steps
    assert submit.options == {"user": "alice", "carries": "job-1", "holder": "pc1"} and submit.carries == "job-1"
    assert release.options == {"carries": "job-1", "holder": "site1"}
    assert (held.name, held.host, held.origin, held.kind) == ("job-1", "mfd-km", "pc1", "print-job")
    assert (accounted.above_kb, accounted.below_kb) == (40, 60)


@pytest.mark.parametrize("old,new,key,words", [
    ("carries: job-1, options", "carries: Job 1, options", "steps[0].carries", "named like a step id"),
    ("flow: mfd-23, from: site1, to: mfd-km, protocol: raw, carries", "flow: mfd-03, from: site1, to: mfd-km, carries",
     "steps[1].carries", "snmp cannot carry a document here; pick a port"),
    ("{holds: job-1, at: mfd-km", "{holds: job-2, at: mfd-km", "steps[2].holds", "not carried by an earlier workflow (carries: job-1)"),
    ("at: mfd-km, in: print-job", "at: mfd-9, in: print-job", "steps[2].at", "no host 'mfd-9'"),
    ("in: print-job", "in: created", "steps[2].in", "unknown kind 'created'; use one of print-job"),
    ("{above: 40, below: 60}", "{above: 60, below: 40}", "steps[3].metadata_kb", "cannot both hold"),
    ("{above: 40, below: 60}", "{}", "steps[3].metadata_kb", "give above: and/or below: (kB, 1000 bytes)"),
    ("in: print-job, says", "within: 5, says", "steps[2].within", "unknown key 'within'"),
])
def test_bad_carries_and_holds_name_line_and_key(tmp_path, old, new, key, words):
    assert old in CARRY
    message = error_of(write(tmp_path, CARRY.replace(old, new, 1)))
    assert f": {key}: " in message and words in message, message


def doc(kind, sha, **more):
    from emulator.protocols.jobstore import Document
    return Document("job-1", kind, 2_000_000, sha, **more)


@pytest.mark.parametrize("there,held,words", [
    ([doc("print-job", "a" * 64, via="raw", peer="198.18.1.10")], True, "mfd-km holds job-1 (print-job, 2000000 B, "
     "sha256 aaaaaaaaaaaa, by raw from 198.18.1.10); the same sha256 as the 2000000 B pc1 created"),
    ([doc("print-job", "b" * 64)], False, "sha256 differs from aaaaaaaaaaaa"),
    ([doc("scan", "a" * 64), doc("created", "a" * 64)], False, "mfd-km holds no job-1 as print-job"),
    ([], False, "mfd-km holds no job-1"),
])
def test_holds_compares_the_sha256_with_the_origins(tmp_path, there, held, words):
    step = load_scenario(write(tmp_path, CARRY), CATALOG).steps[2]
    verdict, observed = runner.judge_holds(step, there, [doc("created", "a" * 64)])
    assert verdict is held and words in observed, observed


def test_holds_checks_the_metadata_size_and_needs_the_origin(tmp_path):
    step = load_scenario(write(tmp_path, CARRY), CATALOG).steps[3]
    for size, held in ((50_000, True), (39_000, False), (61_000, False)):
        assert runner.judge_holds(step, [doc("accounting", "a" * 64, metadata_bytes=size)],
                                  [doc("created", "a" * 64)])[0] is held
    assert runner.judge_holds(step, [doc("accounting", "a" * 64, metadata_bytes=50_000)], []) == \
        (False, "pc1 never created job-1 (its first workflow did not run there)")


def test_a_run_reads_the_stores_and_prints_holds_in_words(tmp_path):
    class Stores(FakeLab):
        def documents(self, host, name=""):
            self.events.append(("documents", host, name))
            return {"pc1": [doc("created", "c" * 64)], "mfd-km": [doc("print-job", "c" * 64, via="raw")],
                    "site2": [doc("accounting", "c" * 64, metadata_bytes=47_500)]}.get(host, [])

    result, out, lab = run(tmp_path, CARRY, lab=Stores())
    assert result.passed, out
    assert "carrying job-1)" in out
    assert "Step 3: expect mfd-km holds job-1 (print-job), the bytes pc1 started with\n" in out
    assert "Step 4: expect site2 holds job-1 (accounting) with 40-60 kB of job metadata" in out
    assert "47.5 kB of metadata" in out
    assert ("documents", "mfd-km", "job-1") in lab.events and ("documents", "pc1", "job-1") in lab.events


def test_holds_on_a_host_whose_daemon_cannot_answer_does_not_hold(tmp_path):
    class Unanswered(FakeLab):
        def documents(self, host, name=""):
            raise LabError(f"the documents {host} holds cannot be read: its daemon is not running (stopped)")

    result, out, _lab = run(tmp_path, CARRY, lab=Unanswered())
    assert [e.held for e in result.expectations] == [False, False]
    assert "DOES NOT HOLD: the documents mfd-km holds cannot be read: its daemon is not running" in out


@pytest.mark.parametrize("name", workflow_stories())
def test_a_workflow_story_passes_its_documents_along_in_one_shared_lab(name):
    """Like a vendor story (no faults, no repair, single-site, generated rules: it shares a lab);
    every document it carries is checked where it arrives."""
    scenario = load_scenario(name, CATALOG)
    assert scenario.topology.name == "single-site" and set(scenario.rules.values()) == {"generated"}
    assert not scenario.repair and not scenario.impairable
    assert not [s for s in scenario.steps if isinstance(s, (schema.Fault, schema.Parallel))]
    carried = {w.carries for w in scenario.workflows().values()} - {""}
    assert carried and carried == {s.name for s in scenario.steps if isinstance(s, schema.Holds)}
    expected_ok = {s.target for s in scenario.steps if isinstance(s, schema.Expect) and s.outcome == "ok"}
    assert expected_ok == set(scenario.workflows())


def test_workflow_stories_run_green_in_a_fake_lab_and_a_blocked_hop_fails_its_holds(tmp_path):
    for name in workflow_stories():
        out = io.StringIO()
        assert command.run_file(name, out, lab_class=FakeLab) == 0, out.getvalue()
    text = (SCENARIOS_DIR / "print-release-workflow.yaml").read_text().replace(
        "  - {id: release,", "  - {fault: block, flow: mfd-23, from: site1, to: mfd-km}\n  - {id: release,")
    result, out, _lab = run(tmp_path, text)
    assert [e.observed for e in result.expectations if not e.held] == [
        "no answer (timeout) after 3.0 s", "mfd-km holds no report-1 as print-job"], out


def test_there_are_the_two_workflow_stories():
    assert {"print-release-workflow", "scan-to-mail-workflow"} <= set(workflow_stories())


CERTIFICATE = """\
name: certificate
description: an expired certificate, then a valid one
topology: single-site
steps:
  - {fault: certificate, host: site1, kind: expired, do: "site1's certificate runs out"}
  - parallel:
      - {id: tls, do: "Xerox logs in over TLS", flow: terminal-server-01, from: mfd-xerox, to: site1, security: tls}
      - {id: plain, do: "Xerox logs in without TLS", flow: terminal-server-01, from: mfd-xerox, to: site1, security: plain}
  - {expect: tls, outcome: protocol_error, detail: "Expired Certificate"}
  - {expect: tls, outcome: protocol_error, detail: "self-signed"}
  - {expect: plain, outcome: ok}
repair:
  - {fault: certificate, host: site1, kind: valid}
  - {id: again, do: "Xerox logs in over TLS again", flow: terminal-server-01, from: mfd-xerox, to: site1, security: tls}
  - {expect: again, outcome: ok}
"""


def test_a_certificate_fault_and_an_expectation_on_the_probes_words(tmp_path):
    result, out, lab = run(tmp_path, CERTIFICATE)
    assert [e for e in lab.events if e[0] == "certificate"] == [("certificate", "site1", "expired"),
                                                                ("certificate", "site1", "valid")]
    assert [(e.number, e.held) for e in result.expectations] == [("3", True), ("4", False), ("5", True), ("8", True)]
    assert ("Step 1: site1's certificate runs out: site1's TLS services (all of them, without a restart) now "
            "present a certificate from the lab CA that has expired\n  -> site1 presents a expired certificate") in out
    assert ("to get a wrong answer, saying 'Expired Certificate'\n  -> holds: an answer, but not the exchange it "
            "needs (protocol error) after 0.0 s; certificate: certificate verify failed: expired certificate") in out
    assert "-> DOES NOT HOLD: an answer, but not the exchange it needs (protocol error) after 0.0 s; " \
           "no probe said 'self-signed'" in out
    assert "now present a new, valid certificate from the lab CA" in out


def test_a_stopped_daemon_is_started_again(tmp_path):
    text = ROLE_DOWN.replace("repair:\n", "repair:\n  - {fault: start, host: site1}\n  - {id: e, do: \"tp4 logs in at "
                             "site1 again\", flow: terminal-server-45, from: tp4, to: site1}\n  - {expect: e, outcome: ok}\n")
    result, out, lab = run(tmp_path, text)
    assert ("start", "site1") in lab.events and lab.events.index(("stop", "site1")) < lab.events.index(("start", "site1"))
    assert "Repair:\nStep 9: the role daemon on site1 starts again: its services open their ports" in out
    assert [(e.number, e.held) for e in result.expectations][-2:] == [("11", True), ("14", True)]
