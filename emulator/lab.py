"""The lab: a Mininet network built from a topology, role daemons in its hosts, a firewall node.

`with Lab(topology) as lab:` builds everything and tears everything down on exit, whatever
happened (exception, Ctrl-C, SIGTERM). Mininet code lives here only; it never parses protocols.
"""
from __future__ import annotations

import json
import os
import selectors
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from emulator import pki, state
from emulator.catalog import Catalog, load_catalog
from emulator.errors import LabError
import roles
from emulator.protocols.base import ProbeResult, ProbeTarget
from emulator.rules import Ruleset, apply_commands
from emulator.topology import LinkShape, Topology

DAEMON_READY_TIMEOUT = 60.0
PROBE_CONCURRENCY = 1024  # one wave: a dropped SYN costs one timeout per host, not one per 256 probes
PROBE_JOB_TIMEOUT = 600.0


def preflight() -> None:
    """Everything the lab needs from the machine, checked before anything is created."""
    if os.geteuid() != 0:
        raise LabError("the lab needs root to create network namespaces: run it with sudo")
    try:
        import mininet.net  # noqa: F401
    except ImportError:
        raise LabError("Mininet is not importable: run ./setup.sh (installs Debian's mininet and a "
                       "virtualenv with --system-site-packages)") from None
    for tool, package in (("brctl", "bridge-utils"), ("iptables-restore", "iptables"), ("nft", "nftables"),
                          ("ping", "iputils-ping"), ("mnexec", "mininet")):
        if not shutil.which(tool):
            raise LabError(f"{tool} is missing: run `apt-get install {package}` (or ./setup.sh)")
    _check_host_forwarding()


def _check_host_forwarding() -> None:
    # Bridged lab frames also traverse the host's own FORWARD chain when bridge-nf-call-iptables=1.
    try:
        bridged = Path("/proc/sys/net/bridge/bridge-nf-call-iptables").read_text().strip() == "1"
    except OSError:
        return  # br_netfilter not loaded: bridged frames skip iptables
    if not bridged:
        return
    rules = subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True, text=True).stdout
    if "-P FORWARD ACCEPT" in rules or "198.18.0.0/15" in rules:
        return
    raise LabError("this host's FORWARD policy drops bridged traffic (net.bridge.bridge-nf-call-iptables=1), "
                   "so lab frames would be dropped; allow the lab range first: "
                   "`iptables -I FORWARD -s 198.18.0.0/15 -d 198.18.0.0/15 -j ACCEPT` (safeq-lab never changes host rules)")


class Lab:
    def __init__(self, topology: Topology, catalog: Catalog | None = None, python: str = sys.executable,
                 certs_dir: str | None = None):
        self.topology = topology
        self.catalog = catalog or load_catalog()
        self.python = python
        self.certs_dir = certs_dir
        self.tls: dict[str, pki.HostTLS] = {}
        self.ca_file = ""
        self.net = None
        self.daemons: dict[str, subprocess.Popen] = {}
        self.timings: dict[str, float] = {}
        self.run_dir = state.RUN_DIR / topology.name

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> "Lab":
        preflight()
        state.claim(self.topology)
        try:
            started = time.monotonic()
            self._build()
            self.timings["build"] = time.monotonic() - started
            started = time.monotonic()
            self._start_daemons()
            self.timings["start"] = time.monotonic() - started
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        started = time.monotonic()
        for proc in self.daemons.values():
            _terminate(proc)
        self.daemons.clear()
        if self.net is not None:
            try:
                self.net.stop()
            finally:
                self.net = None
        state.release(self.topology)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.timings["teardown"] = time.monotonic() - started

    # -- build ----------------------------------------------------------------------------------
    def _build(self) -> None:
        from mininet.link import Link, TCLink
        from mininet.log import setLogLevel
        from mininet.net import Mininet
        from mininet.node import Node
        from mininet.nodelib import LinuxBridge

        setLogLevel("error")
        topo = self.topology
        net = Mininet(topo=None, controller=None, switch=LinuxBridge, build=False, autoSetMacs=False)
        self.net = net
        firewall = net.addHost(topo.firewall, cls=Node, ip=None)
        for index, zone in enumerate(topo.zones, start=1):
            bridge = net.addSwitch(topo.bridge(zone), dpid=f"{index:x}", stp=False)
            prefix = zone.subnet.prefixlen
            net.addLink(firewall, bridge, cls=_link_class(zone.link, TCLink, Link),
                        intfName1=topo.firewall_interface(zone), params1={"ip": f"{zone.gateway}/{prefix}"},
                        **_link_params(zone.link))
            for spec in zone.hosts:
                host = net.addHost(spec.name, ip=f"{spec.address}/{prefix}", defaultRoute=f"via {zone.gateway}")
                net.addLink(host, bridge, cls=_link_class(spec.link, TCLink, Link), **_link_params(spec.link))
        state.record(self.topology, pids=[], note="building")
        net.build()
        net.start()
        firewall.cmd("echo 1 > /proc/sys/net/ipv4/ip_forward")  # per-namespace; no procps needed
        state.record(self.topology, pids=[n.pid for n in net.hosts])
        self._apply_loss()

    def _apply_loss(self) -> None:
        # sch_netem is not in every kernel; random loss at the firewall works everywhere.
        fw = self.net.get(self.topology.firewall)
        for zone in self.topology.zones:
            if zone.link.loss:
                self._fw_cmd(fw, ["iptables", "-t", "mangle", "-A", "FORWARD", "-i", self.topology.firewall_interface(zone),
                                  "-m", "statistic", "--mode", "random", "--probability",
                                  f"{zone.link.loss / 100:.4f}", "-j", "DROP"])

    def _issue_certificates(self) -> None:
        """The lab CA signs every host's certificate; a customer's pairs (--certs) replace them."""
        hosts = self.topology.hosts
        self.tls = pki.LabCA().write(self.run_dir / "pki", [(h.name, h.address) for h in hosts])
        bundle = [Path(next(iter(self.tls.values())).ca_file).read_text()]
        if self.certs_dir:
            customer = pki.load_pki_dir(self.certs_dir, [h.name for h in hosts])
            self.tls.update(customer)
            bundle.append(Path(self.certs_dir, "ca.pem").read_text())
        trust = self.run_dir / "pki" / "trust.pem"
        trust.write_text("\n".join(bundle))
        self.ca_file = str(trust)

    @property
    def pre_installed_hosts(self) -> set[str]:
        """Hosts still presenting the lab's pre-installed certificate."""
        return {host for host, material in self.tls.items() if pki.is_pre_installed(material.cert_file)}

    def _start_daemons(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._issue_certificates()
        for spec in self.topology.hosts:
            persona = {"address": spec.address, **self.tls[spec.name].to_dict(), "ca_file": self.ca_file}
            daemon = roles.daemon_spec(spec.name, spec.roles, str(self.run_dir / f"{spec.name}.requests.jsonl"),
                                       self.catalog, persona)
            # every host runs a daemon, listeners or not: it is also the host's prober
            daemon["control"] = str(self._control_socket(spec.name))
            spec_file = self.run_dir / f"{spec.name}.json"
            spec_file.write_text(json.dumps(daemon))
            node = self.net.get(spec.name)
            with open(self.run_dir / f"{spec.name}.stderr", "w") as stderr:
                self.daemons[spec.name] = node.popen([self.python, "-m", "emulator.roled", str(spec_file)],
                                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                     stderr=stderr, text=True)
        state.record(self.topology, pids=[n.pid for n in self.net.hosts] + [p.pid for p in self.daemons.values()])
        self._await_ready()

    def _await_ready(self) -> None:
        # Readiness is each daemon's own word from inside its host, never a probe across the firewall.
        selector = selectors.DefaultSelector()
        for name, proc in self.daemons.items():
            selector.register(proc.stdout, selectors.EVENT_READ, name)
        pending, deadline = set(self.daemons), time.monotonic() + DAEMON_READY_TIMEOUT
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LabError(f"role daemons did not start within {DAEMON_READY_TIMEOUT:.0f}s on: {', '.join(sorted(pending))}")
            for key, _ in selector.select(timeout=remaining):
                name = key.data
                line = key.fileobj.readline().strip()
                selector.unregister(key.fileobj)
                pending.discard(name)
                if not line.startswith("READY"):
                    stderr = (self.run_dir / f"{name}.stderr").read_text().strip().splitlines()
                    raise LabError(f"role daemon on {name} failed: {line or (stderr[-1] if stderr else 'exited')}")
        selector.close()

    # -- rules ---------------------------------------------------------------------------------
    def apply_rules(self, ruleset: Ruleset) -> None:
        fw = self.net.get(self.topology.firewall)
        for argv, stdin in apply_commands(ruleset):
            self._fw_cmd(fw, argv, stdin, what=ruleset.source)
        self._apply_loss()

    def _fw_cmd(self, fw, argv, stdin=None, what="firewall"):
        proc = fw.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _, err = proc.communicate(stdin, timeout=60)
        if proc.returncode != 0:
            first = next((l for l in err.splitlines() if l.strip()), "failed")
            raise LabError(f"applying {what} on the firewall node failed: {argv[0]}: {first}")

    # -- probes ------------------------------------------------------------------------------------
    def _control_socket(self, host: str) -> Path:
        return self.run_dir / f"{host}.ctl"

    def run_probes(self, targets_by_host: dict[str, list[ProbeTarget]],
                   concurrency: int = PROBE_CONCURRENCY) -> dict[str, ProbeResult]:
        """Every host probes from inside its namespace (its daemon does), all hosts at once."""
        def run(host: str) -> list[ProbeResult]:
            job = json.dumps({"targets": [t.to_dict() for t in targets_by_host[host]],
                              "concurrency": concurrency}).encode() + b"\n"
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as control:
                control.settimeout(PROBE_JOB_TIMEOUT)
                control.connect(str(self._control_socket(host)))
                control.sendall(job)
                reply = control.makefile("rb").readline()
            answer = json.loads(reply) if reply else {"error": "the daemon closed the control socket"}
            if "error" in answer:
                raise LabError(f"probing from {host} failed: {answer['error']}")
            return [ProbeResult.from_dict(r) for r in answer["results"]]

        hosts = [h for h, targets in targets_by_host.items() if targets]
        results: dict[str, ProbeResult] = {}
        with ThreadPoolExecutor(max_workers=max(1, len(hosts))) as pool:
            for batch in pool.map(run, hosts):
                results.update((r.id, r) for r in batch)
        return results

    def request_log(self) -> list[dict]:
        """What the stubs recorded: the servers' witness of each request."""
        records = []
        for path in self.run_dir.glob("*.requests.jsonl"):
            for line in path.read_text().splitlines():
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
        return records

    def node(self, name: str):
        return self.net.get(name)


def _link_class(shape: LinkShape, shaped_cls, plain_cls):
    return shaped_cls if shape.bw is not None or shape.delay_ms is not None else plain_cls


def _link_params(shape: LinkShape) -> dict:
    params = {}
    if shape.bw is not None:
        params["bw"] = shape.bw
    if shape.delay_ms is not None:
        if not Path("/sys/module/sch_netem").exists() and subprocess.run(["modprobe", "-q", "sch_netem"]).returncode:
            raise LabError("link delay needs the kernel's sch_netem qdisc, which this kernel lacks; "
                           "remove delay_ms from the topology (bandwidth and loss work)")
        params["delay"] = f"{shape.delay_ms}ms"
    return params


def _terminate(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    for stream in (proc.stdout, proc.stderr, proc.stdin):
        if stream:
            stream.close()
