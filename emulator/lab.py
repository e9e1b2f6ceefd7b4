"""The lab: a Mininet network built from a topology, role daemons in its hosts, firewall nodes.

`with Lab(topology) as lab:` builds everything and tears everything down on exit, whatever
happened (exception, Ctrl-C, SIGTERM). Mininet code lives here only; it never parses protocols.

Every firewall node routes for its zones; several are joined by the topology's transit segment,
each with static routes to the others' zones. Any filtering node (firewall node, or host with a
host firewall) holds one ruleset at a time (`apply_rules`) and can be traced (`start_trace`):
`nft monitor trace` in its namespace records which rule decided each traced packet.

Links can be impaired (emulator.impair): a link the topology shapes, or one named in
`Lab(..., impairable=[...])`, gets a transparent shaper node between the firewall node and the
bridge, never on the firewall under test (a user's ruleset there may flush everything);
`impair(link, Impairment)` and `clear_impairment(link)` change it while the lab runs. Without
either, the lab builds no shaper at all. Shapers and their delayers go with the lab's teardown and
are recorded for `safeq-lab clean`.

The lab keeps to itself. Every host and firewall node drops and counts any packet to an address
outside 198.18.0.0/15 (loopback excepted) and all IPv6 (`EGRESS_TABLE`, re-added after each
ruleset; `egress_drops`). Link-local multicast (224.0.0.0/24: the IGMP reports the kernel sends, and
repeats, when an interface comes up) is dropped too but not counted: it never leaves a link, and
counting it would make the count depend on timing. IPv6 is off inside its namespaces, and every link it creates in the
host's own namespace (bridges, root-side veth ends) has IPv6 disabled before it is brought up, so
the host never gains an address or a neighbour on them. Teardown (`close`) defers SIGINT, SIGTERM
and SIGHUP until it has finished, then raises the first one caught.
"""
from __future__ import annotations

import ctypes
import functools
import json
import os
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import roles
from emulator import impair, jobs, pki, schedule, state
from emulator.catalog import Catalog, load_catalog
from emulator.errors import LabError
from emulator.protocols.base import ProbeResult, ProbeTarget
from emulator.rules import Ruleset, apply_commands, load_rules_file
from emulator.impair import Impairment
from emulator.topology import INTERFACE_MAX, LinkShape, Topology, bridge_name, port_name
from emulator.trace import MONITOR_COMMAND, TRACE_TABLE, TRACE_TABLE_NAME
from emulator.zygote import Zygote, daemon_groups

DAEMON_READY_TIMEOUT = 60.0
PROBE_JOB_TIMEOUT = 600.0
COMMAND_TIMEOUT = 60.0
PORTS_GONE_WAIT = 2.0  # seconds for the kernel to remove a stopped lab's ports with its namespaces
DELAYER_TIMEOUT = 10.0  # for the delayer to bind its queues, or to answer a command
TRACE_LISTEN_TIMEOUT = 10.0  # until `nft monitor trace` has joined the kernel's trace group
TRACE_DRAIN_TIMEOUT = 5.0  # without progress, before the monitor is stopped with events still queued
# nft sets its monitor socket's receive buffer to 16 MiB (32 MiB accounted): ~28,000 trace events,
# about 2,800 first packets (10 events each through a firewall node). A burst beyond that is lost
# (ENOBUFS), so the lab raises the buffer of the monitor's socket (pidfd_getfd + SO_RCVBUFFORCE):
# memory is only used while events wait, and the monitor writes ~30,000 events/s (measured).
TRACE_BUFFER = 128 * 1024 * 1024
NETLINK_NETFILTER = 12
NFNLGRP_NFTRACE = 9  # the netfilter netlink group trace events are multicast to
SYS_PIDFD_GETFD = 438  # the same number on every architecture (Linux >= 5.6)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # held back while the lab is torn down

# Nothing leaves the lab: in every host and firewall node, before the trace table marks packets
# (-310) and before the witness (-190), so neither ever sees such a packet. Prerouting covers what
# a firewall node would forward (and what is addressed to it).
EGRESS_TABLE_NAME = "safeq_lab_egress"
EGRESS_COUNTER = "dropped"
EGRESS_PRIORITY = -350
_EGRESS_CHAIN = """  chain {name} {{
    type filter hook {hook} priority {priority}; policy accept;
    {lo} "lo" accept
    meta nfproto ipv6 counter name {counter} drop
    ip daddr 224.0.0.0/24 drop
    ip daddr != {{ 127.0.0.0/8, 198.18.0.0/15 }} counter name {counter} drop
  }}
"""
EGRESS_TABLE = (f"table inet {EGRESS_TABLE_NAME}\ndelete table inet {EGRESS_TABLE_NAME}\n"
                f"table inet {EGRESS_TABLE_NAME} {{\n  counter {EGRESS_COUNTER} {{ }}\n"
                + _EGRESS_CHAIN.format(name="out", hook="output", priority=EGRESS_PRIORITY, lo="oifname",
                                       counter=EGRESS_COUNTER)
                + _EGRESS_CHAIN.format(name="pre", hook="prerouting", priority=EGRESS_PRIORITY, lo="iifname",
                                       counter=EGRESS_COUNTER)
                + "}\n")


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


def root_interfaces(topology: Topology, run_id: str) -> list[str]:
    """The links run `run_id` creates in the host's own namespace: each bridge and its ports, in creation order.

    Bridge N's ports are `sqlab<N>p<M><run>` (emulator.topology.port_name), numbered as links are
    added (the firewall node's first), so they are known, and recorded, before anything exists.
    """
    sizes = [len(zone.hosts) + 1 for zone in topology.zones]
    if topology.transit is not None:
        sizes.append(len(topology.firewalls))
    names = []
    for index, size in enumerate(sizes, start=1):
        names += [bridge_name(index, run_id)] + [port_name(index, n, run_id) for n in range(1, size + 1)]
    too_long = [n for n in names if len(n) > INTERFACE_MAX]
    if too_long:
        raise LabError(f"topology {topology.name} is too large for the lab's interface names ({too_long[0]} "
                       f"is longer than {INTERFACE_MAX} characters): fewer zones, or fewer hosts per zone")
    return names


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP until the block is done, then raise the first one caught.

    The previous handlers are restored and the signal is raised again, so it has whatever effect
    it would have had (KeyboardInterrupt, the CLI's termination exception, or the default action).
    Outside the main thread, where handlers cannot be set, the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, _frame: caught.append(signum))
                for signum in DEFERRED_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        if caught:
            signal.raise_signal(caught[0])


def _disable_ipv6(ifname: str) -> None:
    """No IPv6 on a link the lab created in the host's namespace (per interface: the host's defaults stay)."""
    try:
        Path(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6").write_text("1\n")
    except FileNotFoundError:
        pass  # IPv6 is off in this kernel: nothing to disable


SHELL_SETTINGS = "unset HISTFILE; stty -echo; set +m"  # what Mininet's Node.startShell runs once its shell is up
IPV6_OFF = ("echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6; "
            "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6")  # a lab namespace's own sysctls


@functools.cache
def _mininet_classes():
    """Mininet's nodes, bridge and links as the lab uses them: shells that start all at once, links
    the lab creates itself (`Lab._create_links`).

    Mininet is imported here only: it is a root-only dependency (preflight says how to install it).
    """
    import pty

    from mininet.link import Link, TCLink
    from mininet.node import Host, Node
    from mininet.nodelib import LinuxBridge

    class ParallelShell:
        """Node.startShell without its wait for the prompt: every node's shell starts at once.

        `send_settings` waits for the prompt and sends the shell's settings (and, in a lab namespace,
        IPv6 off), `waitOutput` collects them; a command sent before that does both first.
        """
        settings = SHELL_SETTINGS

        def startShell(self, mnopts=None):
            # Node.startShell's own steps, up to its wait for the prompt; the shell's other descriptors
            # are closed by Python (close_range), not by `mnexec -c` (a close() for each of 20,000)
            opts = "-d" + ("n" if self.inNamespace else "")
            argv = ["mnexec", opts, "env", "PS1=" + chr(127), "bash", "--norc", "--noediting", "-is",
                    "mininet:" + self.name]
            self.master, self.slave = pty.openpty()
            self.shell = self._popen(argv, stdin=self.slave, stdout=self.slave, stderr=self.slave, close_fds=True)
            self.stdin = self.stdout = os.fdopen(self.master, "r")
            self.pid = self.shell.pid
            self.pollOut = select.poll()
            self.pollOut.register(self.stdout)
            self.outToNode[self.stdout.fileno()] = self
            self.inToNode[self.stdin.fileno()] = self
            self.execed, self.lastCmd, self.lastPid, self.readbuf = False, None, None, ""
            self.waiting = True  # for the prompt: the first one ends it, as a command's sentinel does
            self.settings_due = True

        def send_settings(self) -> None:
            self.waitOutput()  # the shell's first prompt (a namespace node's namespace exists from then on)
            self.settings_due = False
            super().sendCmd(self.settings)

        def sendCmd(self, *args, **kwargs):
            if self.settings_due:
                self.send_settings()
                self.waitOutput()
            super().sendCmd(*args, **kwargs)

    class LabHost(ParallelShell, Host):
        """A host, firewall node or shaper: its namespace has IPv6 off before its first link exists."""
        settings = f"{SHELL_SETTINGS}; {IPV6_OFF}"

    class LabBridge(ParallelShell, LinuxBridge):
        """A bridge of the host's namespace: the lab creates it, its ports and brings them up itself
        (`Lab._create_links`); Mininet keeps the node (its shell runs shaped ports' tc commands)."""

        def __init__(self, name, dpid=None, stp=False, prio=None, opts="", listenPort=None, **params):
            # LinuxBridge's and Switch's __init__ without Switch's control interface: `ifconfig lo up`
            # in the host's namespace, a command that would wait for this shell (a lab bridge needs none)
            self.stp, self.prio = stp, prio
            Node.__init__(self, name, **params)
            self.dpid, self.opts, self.listenPort = self.defaultDpid(dpid), opts, listenPort

    class Premade:
        """A link whose veth pair the lab created already (`Lab._create_links`): Mininet only records it."""

        @classmethod
        def makeIntfPair(cls, *_args, **_kwargs):
            pass

    class PremadeLink(Premade, Link):
        pass

    class PremadeTCLink(Premade, TCLink):
        pass

    return LabHost, LabBridge, PremadeLink, PremadeTCLink


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


@dataclass
class Veth:
    """A veth pair the lab creates itself (`_create_links`), then shows Mininet."""

    node1: object  # a Mininet node: end 1 is in its namespace
    name1: str
    node2: object  # a namespace node too, or a bridge: end 2 is then its port
    name2: str
    address1: str = ""  # end 1's address/prefix, if it has one
    shape: dict = field(default_factory=dict)  # a shaped host link's TCLink parameters (`_link_params`)
    macs: tuple[str, str] = ("", "")


@dataclass
class Shaper:
    """The transparent node impairing one link (emulator.impair), and what it does now."""

    link: str
    node: str
    first_queue: int  # its delayer's NFQUEUE numbers: this one and the next
    impairment: Impairment = Impairment()
    delayer: subprocess.Popen | None = None


class Lab:
    def __init__(self, topology: Topology, catalog: Catalog | None = None, python: str = sys.executable,
                 certs_dir: str | None = None, impairable: Iterable[str] = (), hosts_per_daemon: int | None = None):
        """`impairable`: links (Topology.link_names) a shaper is put on although the topology does not
        impair them, so that `impair` can change them while the lab runs. `hosts_per_daemon`: how many
        hosts one role-daemon process serves at most (default: zygote.daemon_groups's choice)."""
        self.topology = topology
        self.hosts_per_daemon = hosts_per_daemon
        unknown = sorted(set(impairable) - set(topology.link_names))
        if unknown:
            raise LabError(f"cannot make {', '.join(unknown)} impairable: not a link of topology {topology.name} "
                           f"(links: {', '.join(topology.link_names)}; a zone's link is named after the zone, "
                           f"a firewall node's link to the transit segment wan-<node>)")
        wanted = set(impairable) | set(topology.shaped_links)
        self._shapers: dict[str, Shaper] = {
            link: Shaper(link, impair.shaper_name(link), 2 * index)
            for index, link in enumerate(topology.link_names) if link in wanted}
        self._netem: bool | None = None  # the kernel has sch_netem (asked once, when first needed)
        self.catalog = catalog or load_catalog()
        self.python = python
        self.certs_dir = certs_dir
        self.tls: dict[str, pki.HostTLS] = {}
        self.lab_ca: pki.LabCA | None = None   # kept to issue certificates while the lab runs
        self.ca_file = ""
        self.net = None
        self.zygote: Zygote | None = None  # forks every host's role daemon (emulator.zygote)
        self.rulesets: dict[str, Ruleset] = {}  # node -> the ruleset it holds now
        self.timings: dict[str, float] = {}
        self.run_id = ""  # given by state.claim: in every name this run creates in the host's namespace
        self.run_dir: Path | None = None  # state.run_dir(topology, run_id), once claimed
        self.interfaces: list[str] = []  # links in the host's namespace, recorded (at claim) before they exist
        self._claimed = False
        self._stopped: set[str] = set()  # daemons stopped on purpose (stop_daemon)
        self._daemon_stderr: dict[str, Path] = {}  # host -> the stderr of the process serving it
        self._monitors: dict[str, subprocess.Popen] = {}  # node -> its `nft monitor trace`
        self._helpers: list[subprocess.Popen] = []  # other processes started in nodes (captures, ...): see popen()
        self.trace_buffer: dict[str, bool] = {}  # node -> its monitor's receive buffer was raised to TRACE_BUFFER
        self.trace_lost: dict[str, int] = {}  # node -> trace events its monitor lost in the last trace

    @property
    def rule_nodes(self) -> tuple[str, ...]:
        """The nodes that hold a ruleset: firewall nodes, then hosts with a host firewall."""
        return self.topology.filtering_nodes

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> "Lab":
        preflight()
        # the topology's own rules files are checked before anything is created
        preset = {node: load_rules_file(str(path)) for node, path in self.topology.rules_files.items()}
        try:
            with deferred_signals():  # a state file exists exactly when this run claimed the lab
                self.run_id, self.interfaces = state.claim(
                    self.topology, functools.partial(root_interfaces, self.topology))
                self.run_dir = state.run_dir(self.topology.name, self.run_id)
                self._claimed = True
            started = time.monotonic()
            self._make_run_dir()
            # the zygote imports every protocol while Mininet builds the network
            self.zygote = Zygote.launch(self.python, self._env(), str(self._stderr_file("zygote")))
            self._build()
            if preset:
                self.apply_rules(preset)
            self.timings["build"] = time.monotonic() - started
            started = time.monotonic()
            self._start_daemons()
            # the daemons' own start, apart from the zygote's imports that outlast the build ("zygote wait")
            self.timings["start"] = time.monotonic() - started - self.timings["zygote wait"]
        except BaseException:
            if self._claimed:
                self.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Stop everything this run started and remove its state, whatever happens meanwhile.

        SIGINT/SIGTERM/SIGHUP wait until it is done (`deferred_signals`), so a second Ctrl-C cannot
        leave half a lab. The state file goes last, and only once the network is gone: if Mininet
        itself fails, `safeq-lab clean` still knows what to remove.
        """
        started = time.monotonic()
        with deferred_signals():
            stopped, stopping = False, None
            try:
                for proc in [*self._monitors.values(), *self._helpers]:
                    _terminate(proc)
                self._monitors.clear()
                self._helpers.clear()
                for shaper in self._shapers.values():
                    if shaper.delayer is not None:
                        _terminate(shaper.delayer)
                        shaper.delayer = None
                if self.zygote is not None:
                    # the daemons stop while the network goes down (their namespaces go once both are done)
                    daemons = ThreadPoolExecutor(max_workers=1)
                    stopping = daemons.submit(self.zygote.close)
                    daemons.shutdown(wait=False)
            finally:
                try:
                    self._stop_network()
                    stopped = True
                finally:
                    try:
                        if stopping is not None:
                            stopping.result()  # its error, if any, once the network is down
                            self.zygote = None
                    finally:
                        if self.run_dir is not None:  # specs, logs, sockets, traces, private keys
                            shutil.rmtree(self.run_dir, ignore_errors=True)
                        if stopped and self._claimed:
                            state.release(self.topology, self.run_id)
                            self._claimed = False
        self.timings["teardown"] = time.monotonic() - started

    def _stop_network(self) -> None:
        """Take the network down in bulk, never through Mininet's per-node shells (`net.stop`).

        Every node's shell is killed at once, which frees the namespaces: the kernel removes their
        interfaces in one batch, and a veth end takes its root-side peer with it (measured on the
        default lab: 0.1 s, where deleting the links one by one took 1.2 s). Meanwhile one `ip -batch`
        deletes the bridges (0.3 s of the kernel's own, overlapping the daemons' stop), and another
        any port still there after PORTS_GONE_WAIT. A shell is never asked to run anything: an
        interrupted command can leave it busy, and Mininet then refuses (an assertion) every later
        command, its own teardown included.
        """
        net, self.net = self.net, None
        nodes = [node for node in net.hosts + net.switches if node.shell is not None] if net is not None else []
        for node in nodes:
            if node.shell.poll() is None:
                try:
                    os.killpg(node.shell.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for node in nodes:
            node.shell.wait()
            node.shell = None
            node.stdin.close()  # the shell's pty, as Mininet's Node.cleanup closes it
            os.close(node.slave)
        if not self._claimed:
            return
        bridges = set(self.topology.run_bridges(self.run_id))
        existing = set(state.lab_links())
        # the bridges go now, while the kernel cleans up the namespaces (and the daemons stop, see close)
        deleting = _delete_links([n for n in self.interfaces if n in bridges and n in existing])
        deadline = time.monotonic() + (PORTS_GONE_WAIT if nodes else 0)
        while True:  # the namespaces' cleanup runs in the kernel's own time
            ports = [n for n in self.interfaces if n in existing and n not in bridges]
            if not ports or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
            existing = set(state.lab_links())
        if deleting is not None:
            deleting.communicate()
        if ports:
            _delete_links(ports).communicate()
        left = sorted(set(self.interfaces) & set(state.lab_links()))
        if left:
            raise LabError(f"could not delete {', '.join(left[:5])}: run `safeq-lab clean`")

    def _record_state(self, note: str = "running") -> None:
        """Everything this run started, so that `safeq-lab clean` can end it after a kill."""
        procs = [n.shell for n in self.net.hosts + self.net.switches if n.shell] if self.net is not None else []
        procs += list(self._monitors.values()) + [p for p in self._helpers if p.poll() is None]
        procs += [self.zygote.proc] if self.zygote is not None else []
        procs += [s.delayer for s in self._shapers.values() if s.delayer is not None]
        pids = [proc.pid for proc in procs] + (self.zygote.pids() if self.zygote is not None else [])
        recorded = [p for p in map(state.process, pids) if p is not None]
        state.record(self.topology, self.run_id, processes=recorded, interfaces=self.interfaces, note=note)

    def _env(self) -> dict[str, str]:
        """The environment of every process the lab starts: marked with this run (see emulator.state)."""
        return {**os.environ, state.RUN_ENV: str(self.run_dir)}

    @contextmanager
    def _marked_environment(self) -> Iterator[None]:
        """Mininet starts its shells with our own environment: mark it with this run while they start."""
        before = os.environ.get(state.RUN_ENV)
        os.environ[state.RUN_ENV] = str(self.run_dir)
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(state.RUN_ENV, None)
            else:
                os.environ[state.RUN_ENV] = before

    # -- build ----------------------------------------------------------------------------------
    def _build(self) -> None:
        """The network in a few bulk steps, not Mininet's command per interface (each a round trip to a
        node's shell, ~2 ms, one after another): every shell starts at once; one `ip -batch` in the
        host's namespace creates all links, another attaches the bridges' ports; each node sets its
        addresses, links and routes in one command, sent to every node before any answer is read."""
        from mininet.log import setLogLevel  # root-only dependency, see _mininet_classes
        from mininet.net import Mininet

        host_cls, bridge_cls, link_cls, tclink_cls = _mininet_classes()
        setLogLevel("error")
        topo = self.topology
        net = Mininet(topo=None, controller=None, host=host_cls, switch=bridge_cls, build=False, autoSetMacs=False)
        self.net = net
        ports: dict[int, int] = {}  # bridge index -> ports so far
        veths: list[Veth] = []
        routes: dict[str, list[str]] = {}  # node -> its routes (`ip -batch` lines), once its links are up

        def port(index: int) -> str:  # bridge index's next root-side end, as root_interfaces() recorded it
            ports[index] = ports.get(index, 0) + 1
            return port_name(index, ports[index], self.run_id)

        def add_node(name):
            node = net.addHost(name, ip=None)  # its address is the lab's to set (_configure_nodes)
            if not node.inNamespace:  # IPv6 goes off in its namespace: the host's own sysctls are never ours
                raise LabError(f"lab node {node.name} is not in a network namespace of its own")
            return node

        with self._marked_environment():
            firewalls = {fw.name: add_node(fw.name) for fw in topo.firewalls}
            def attach(firewall, interface: str, address: str, bridge, index: int, link: str) -> None:
                """The firewall node's interface to a bridge, through the link's shaper if it has one."""
                shaper = self._shapers.get(link)
                if shaper is None:
                    veths.append(Veth(firewall, interface, bridge, port(index), address))
                    return
                node = add_node(shaper.node)
                veths.append(Veth(firewall, interface, node, impair.FW_PORT, address))
                veths.append(Veth(node, impair.NET_PORT, bridge, port(index)))

            for index, zone in enumerate(topo.zones, start=1):
                bridge = net.addSwitch(topo.bridge(zone, self.run_id), dpid=f"{index:x}", stp=False)
                prefix = zone.subnet.prefixlen
                attach(firewalls[topo.zone_firewall(zone).name], topo.firewall_interface(zone),
                       f"{zone.gateway}/{prefix}", bridge, index, zone.name)
                for spec in zone.hosts:
                    veths.append(Veth(add_node(spec.name), f"{spec.name}-eth0", bridge, port(index),
                                      f"{spec.address}/{prefix}", _link_params(spec.link, spec.name, zone.name)))
                    routes[spec.name] = [f"route add default via {zone.gateway}"]
            if topo.transit is not None:
                transit_index = len(topo.zones) + 1
                transit = net.addSwitch(topo.run_transit_bridge(self.run_id), dpid=f"{transit_index:x}", stp=False)
                for fw in topo.firewalls:
                    attach(firewalls[fw.name], fw.transit_interface, f"{fw.transit_address}/{topo.transit.prefixlen}",
                           transit, transit_index, fw.wan_link)
            self._record_state("building")
        for fw in topo.firewalls:
            routes[fw.name] = [f"route add {topo.zone(zone_name).subnet} via {other.transit_address}"
                               for other in topo.firewalls if other.name != fw.name for zone_name in other.zones]
        _each_shell(net.hosts + net.switches, lambda node: node.send_settings())  # IPv6 off before any link
        attaching = _create_links(net, veths)
        self._configure_nodes(veths, routes, forwarding=set(firewalls))
        _batch_done(attaching, "attaching the bridges' ports")
        for veth in veths:  # Mininet's own view of each link (a shaped one's tc commands run now)
            link = net.addLink(veth.node1, veth.node2, cls=tclink_cls if veth.shape else link_cls,
                               intfName1=veth.name1, intfName2=veth.name2, addr1=veth.macs[0], addr2=veth.macs[1],
                               up=None, **veth.shape)
            if veth.address1:
                link.intf1.ip, link.intf1.prefixLen = veth.address1.split("/")
        self._record_state()
        for shaper in self._shapers.values():
            self._start_shaper(shaper)

    def _configure_nodes(self, veths: list[Veth], routes: dict[str, list[str]], forwarding: set[str]) -> None:
        """Each lab namespace's addresses, links (up), lo, routes and, in hosts and firewall nodes, the
        egress table: one command per node, run by its shell, every node at once. Its `ip -batch` and
        nft input are files: a shell's command line is cut at 4 KiB."""
        egress = self.run_dir / "egress.nft"
        egress.write_text(EGRESS_TABLE)
        egress_nodes = set(self.egress_nodes)
        batches: dict[str, list[str]] = {node.name: [] for node in self.net.hosts}
        for veth in veths:
            if veth.address1:
                batches[veth.node1.name].append(f"addr add {veth.address1} brd + dev {veth.name1}")
            batches[veth.node1.name].append(f"link set dev {veth.name1} up")
            if veth.node2.inNamespace:
                batches[veth.node2.name].append(f"link set dev {veth.name2} up")
        commands = {}
        for node in self.net.hosts:
            path = self.run_dir / f"{node.name}.links"
            path.write_text("".join(f"{line}\n" for line in [*batches[node.name], "link set dev lo up",
                                                              *routes.get(node.name, [])]))
            steps = (["echo 1 > /proc/sys/net/ipv4/ip_forward"] if node.name in forwarding else [])  # no procps needed
            steps.append(f"ip -batch {shlex.quote(str(path))}")
            steps += [f"nft -f {shlex.quote(str(egress))}"] if node.name in egress_nodes else []
            commands[node] = " && ".join(steps)
        _each_shell(list(commands), lambda node: node.sendCmd(commands[node]), "setting up its links")

    @property
    def egress_nodes(self) -> tuple[str, ...]:
        """Every node holding the egress table: firewall nodes, then hosts."""
        return tuple(fw.name for fw in self.topology.firewalls) + tuple(h.name for h in self.topology.hosts)

    def egress_drops(self) -> dict[str, int]:
        """node -> packets it dropped because they were addressed outside the lab (or IPv6), since the
        node's last ruleset was applied (the table is re-added with it)."""
        def read(name: str) -> tuple[str, int]:
            listing = self.nft(name, ["list", "counter", "inet", EGRESS_TABLE_NAME, EGRESS_COUNTER], json=True)
            counters = [item["counter"] for item in json.loads(listing).get("nftables", []) if "counter" in item]
            return name, sum(int(c.get("packets", 0)) for c in counters)

        return dict(_each(read, list(self.egress_nodes)))

    # -- impairments: shaper nodes (emulator.impair) ---------------------------------------------
    @property
    def links(self) -> tuple[str, ...]:
        """The links this lab can impair (each has a shaper): those the topology impairs, and `impairable`."""
        return tuple(self._shapers)

    def _shaper(self, link: str) -> Shaper:
        shaper = self._shapers.get(link)
        if shaper is None:
            known = ", ".join(self.links) or "none"
            if link in self.topology.link_names:
                raise LabError(f"link {link!r} was not made impairable (impairable links: {known}): pass it in "
                               f"Lab(..., impairable=[{link!r}]) so that the lab puts a shaper on it")
            raise LabError(f"topology {self.topology.name} has no link {link!r} (links: "
                           f"{', '.join(self.topology.link_names)}; impairable: {known})")
        if self.net is None:
            raise LabError(f"the lab is not running: cannot impair {link}")
        return shaper

    def _start_shaper(self, shaper: Shaper) -> None:
        """Join the shaper's two veths with a bridge whose IPv4 frames cross its iptables, then impair it."""
        node = self.net.get(shaper.node)
        self._node_cmd(node, ["ip", "-batch", "-"], impair.SHAPER_SETUP, what="the shaper's bridge")
        # per-namespace: bridged IPv4 of this namespace's bridge crosses its iptables FORWARD chain
        node.cmd("echo 1 > /proc/sys/net/bridge/bridge-nf-call-iptables")
        if node.cmd("cat /proc/sys/net/bridge/bridge-nf-call-iptables").strip() != "1":
            raise LabError(f"shaper {shaper.node} cannot filter bridged frames: the kernel lacks br_netfilter "
                           "(`modprobe br_netfilter`), which impairments need")
        self.impair(shaper.link, self.topology.link_shape(shaper.link))

    def impair(self, link: str, impairment: Impairment) -> str:
        """Apply (or replace) the link's impairment now; one line saying what it does and by which mechanism."""
        shaper = self._shaper(link)
        if self._netem is None:
            self._netem = impair.kernel_has_netem()
        chosen = impair.mechanisms(impairment, self._netem)
        node = self.net.get(shaper.node)
        what = f"the impairment of link {link}"
        if chosen.delay == "delayer":
            self._delayer_config(shaper, impairment)
        for port in impair.PORTS:
            node.cmd(f"tc qdisc del dev {port} root 2>/dev/null")  # none there is fine
            for argv in impair.tc_commands(port, impairment, chosen):
                self._node_cmd(node, argv, what=what)
        self._node_cmd(node, ["iptables-restore"], impair.iptables_rules(impairment, chosen, shaper.first_queue),
                       what=what)
        if chosen.delay != "delayer" and shaper.delayer is not None:
            self._stop_delayer(shaper)  # its queue rules are gone: it releases what it holds, then exits
        shaper.impairment = impairment
        return impair.describe(impairment, chosen, shaper.node)

    def clear_impairment(self, link: str) -> str:
        """The link passes everything unchanged again (its shaper stays)."""
        return self.impair(link, Impairment())

    def impairment(self, link: str) -> Impairment:
        return self._shaper(link).impairment

    def delayer_stats(self, link: str) -> dict:
        """The link's delayer counters per queue (admitted, released, held, most_held, dropped); {} without one."""
        shaper = self._shaper(link)
        if shaper.delayer is None:
            return {}
        shaper.delayer.stdin.write("stats\n")
        shaper.delayer.stdin.flush()
        return json.loads(self._delayer_line(shaper))

    def _delayer_config(self, shaper: Shaper, impairment: Impairment) -> None:
        """Start the link's delayer (its queues bound before any rule sends packets there), or reconfigure it."""
        delay, jitter = impairment.delay_ms or 0, impairment.jitter_ms or 0
        if shaper.delayer is not None and shaper.delayer.poll() is None:
            shaper.delayer.stdin.write(json.dumps({"delay_ms": delay, "jitter_ms": jitter}) + "\n")
            shaper.delayer.stdin.flush()
            answer = self._delayer_line(shaper)
            if answer != "OK":
                raise LabError(f"the delayer of link {shaper.link} refused its new delay: {answer}")
            return
        queues = impair.queues(shaper.first_queue).values()
        with open(self._stderr_file(shaper.node), "a") as stderr:
            shaper.delayer = self.net.get(shaper.node).popen(
                [self.python, "-m", "emulator.delayer", "--queues", ",".join(map(str, queues)),
                 "--delay-ms", str(delay), "--jitter-ms", str(jitter)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True, env=self._env())
        self._record_state()
        said = self._delayer_line(shaper)
        if said != "READY":
            raise LabError(f"the delayer of link {shaper.link} did not start: "
                           f"{said or self._last_stderr_line(shaper.node) or 'no answer'}")

    def _delayer_line(self, shaper: Shaper) -> str:
        proc = shaper.delayer
        ready, _, _ = select.select([proc.stdout], [], [], DELAYER_TIMEOUT)
        if not ready:
            raise LabError(f"the delayer of link {shaper.link} did not answer within {DELAYER_TIMEOUT:.0f}s")
        return proc.stdout.readline().strip()

    def _stop_delayer(self, shaper: Shaper) -> None:
        proc, shaper.delayer = shaper.delayer, None
        proc.stdin.close()  # end of input: it releases its held packets when due, then exits
        try:
            proc.wait(timeout=DELAYER_TIMEOUT + (shaper.impairment.delay_ms or 0) / 1000)
        except subprocess.TimeoutExpired:
            pass
        _terminate(proc)
        self._record_state()

    def _issue_certificates(self) -> None:
        """The lab CA signs every host's certificate; a customer's pairs (--certs) replace them."""
        hosts = self.topology.hosts
        self.lab_ca = pki.LabCA()
        self.tls = self.lab_ca.write(self.run_dir / "pki", [(h.name, h.address) for h in hosts])
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
        self._issue_certificates()
        specs = {}
        for spec in self.topology.hosts:
            persona = {"address": spec.address, **self.tls[spec.name].to_dict(), "ca_file": self.ca_file}
            daemon = roles.daemon_spec(spec.name, spec.roles, str(self.run_dir / f"{spec.name}.requests.jsonl"),
                                       self.catalog, persona, site=self.topology.profile)
            if spec.persona:  # a device recorded from a real one: its captured values beat the role's defaults
                daemon["persona"]["identity"].update(self.topology.personas[spec.persona])
            # every host runs a daemon, listeners or not: it is also the host's prober
            daemon["control"] = str(self._control_socket(spec.name))
            specs[spec.name] = self.run_dir / f"{spec.name}.json"
            specs[spec.name].write_text(json.dumps(daemon))
        # the specs are written first: a zygote that is ready and has no job builds spares meanwhile
        waited = time.monotonic()
        try:
            self.zygote.await_ready(DAEMON_READY_TIMEOUT)
        except (RuntimeError, TimeoutError) as exc:
            raise LabError(f"the role daemons' zygote failed: {exc}: {self._last_stderr_line('zygote')}") from None
        self.timings["zygote wait"] = time.monotonic() - waited
        self._record_state()
        for group in daemon_groups(list(specs), os.cpu_count() or 1, self.hosts_per_daemon):
            stderr = self.run_dir / f"{group[0]}.stderr"
            self._daemon_stderr.update(dict.fromkeys(group, stderr))
            self.zygote.spawn_group([(host, self.net.get(host).pid, str(specs[host])) for host in group], str(stderr))
        # Readiness is each daemon's own word from inside its host, never a probe across the firewall.
        silent = self.zygote.await_started([h.name for h in self.topology.hosts], DAEMON_READY_TIMEOUT)
        self._record_state()
        if silent:
            raise LabError(f"role daemons did not start within {DAEMON_READY_TIMEOUT:.0f}s on: {', '.join(sorted(silent))}")
        for host, daemon in self.zygote.daemons.items():
            if not daemon.said.startswith("READY"):
                raise LabError(f"role daemon on {host} failed: "
                               f"{daemon.said.removeprefix('ERROR ') or self._last_stderr_line(host) or 'exited'}")

    def _make_run_dir(self) -> None:
        for directory in (self.run_dir, self.run_dir / "pki"):  # private keys: readable by root only
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            directory.chmod(0o700)

    def _stderr_file(self, host: str) -> Path:
        return self._daemon_stderr.get(host) or self.run_dir / f"{host}.stderr"

    # -- daemons ---------------------------------------------------------------------------------
    def daemon_alive(self, host: str) -> bool:
        daemon = self.zygote.daemons.get(host) if self.zygote is not None else None
        return daemon is not None and daemon.returncode is None

    def dead_daemons(self) -> dict[str, str]:
        """host -> why its daemon is gone (its last stderr line), for every daemon that is not running."""
        dead = {}
        for host, daemon in (self.zygote.daemons.items() if self.zygote is not None else ()):
            if daemon.returncode is None:
                continue
            said = self._last_stderr_line(host)
            if host in self._stopped:
                dead[host] = f"stopped by the lab{': ' + said if said else ''}"
            else:
                dead[host] = said or f"exited with status {daemon.returncode}"
        return dead

    def stop_daemon(self, host: str) -> None:
        """Stop one host's daemon (a stub down): its ports close and it probes no more."""
        if self.zygote is None or host not in self.zygote.daemons:
            raise LabError(f"no daemon runs on {host!r}; hosts: {', '.join(self.zygote.daemons if self.zygote else ())}")
        self._stopped.add(host)
        if not self.zygote.sharing(host):
            self.zygote.stop([host])
            return
        # its process serves other hosts too: only this host's listeners and prober stop
        reply = self._control(host, jobs.StopJob())
        if not isinstance(reply, jobs.StopReply) or not self.zygote.await_exited(host, DAEMON_READY_TIMEOUT):
            raise LabError(f"the role daemon of {host} did not stop: "
                           f"{reply.error if isinstance(reply, jobs.JobError) else 'it did not say it had'}")

    def start_daemon(self, host: str) -> None:
        """Start a stopped host's daemon again in place (its ports open, it probes again): the spec it
        started with, presenting the certificate in force (a `certificate` fault's)."""
        if self.zygote is None or host not in self.zygote.daemons:
            raise LabError(f"no daemon was started on {host!r}; "
                           f"hosts: {', '.join(self.zygote.daemons if self.zygote else ())}")
        if self.daemon_alive(host):
            raise LabError(f"the role daemon on {host} is running; stop it first")
        spec_file = self.run_dir / f"{host}.json"
        spec = json.loads(spec_file.read_text())
        spec["persona"].update(cert_file=self.tls[host].cert_file, key_file=self.tls[host].key_file)
        spec_file.write_text(json.dumps(spec))
        self._control_socket(host).unlink(missing_ok=True)   # left behind when the daemon was killed
        self._daemon_stderr[host] = self.run_dir / f"{host}.stderr"  # in a process of its own now
        self.zygote.spawn(host, self.net.get(host).pid, str(spec_file), str(self._stderr_file(host)))
        silent = self.zygote.await_started([host], DAEMON_READY_TIMEOUT)
        self._record_state()
        said = self.zygote.daemons[host].said
        if silent or not said.startswith("READY"):
            raise LabError(f"role daemon on {host} did not start again: "
                           f"{said.removeprefix('ERROR ') or self._last_stderr_line(host) or 'no answer'}")
        self._stopped.discard(host)

    def install_certificate(self, host: str, kind: str) -> str:
        """A new certificate of `kind` (pki.CERTIFICATE_KINDS) on every TLS listener of the host, for
        new connections, without restarting its daemon; what it is, in words."""
        if self.lab_ca is None or host not in self.tls:
            raise LabError(f"no certificate to replace on {host!r}; hosts: {', '.join(self.tls)}")
        spec = self.topology.host(host)
        identity = json.loads((self.run_dir / f"{host}.json").read_text())["persona"].get("identity", {})
        model = str(identity.get("make_model") or host)
        cert_file, key_file = pki.write_certificate(self.lab_ca, kind, self.run_dir / "pki", host, spec.address,
                                                    model)
        reply = self._control(host, jobs.CertificateJob(cert_file, key_file))
        if not isinstance(reply, jobs.CertificateReply):
            why = reply.error if isinstance(reply, jobs.JobError) else "its daemon answered another job"
            raise LabError(f"cannot install a certificate on {host}: {why}")
        if not reply.contexts:
            raise LabError(f"{host} serves nothing over TLS: no listener presents a certificate to replace")
        self.tls[host] = pki.HostTLS(cert_file, key_file, self.tls[host].ca_file)
        return f"{host} presents {pki.describe_certificate(cert_file)}"

    def _last_stderr_line(self, host: str) -> str:
        try:
            lines = self._stderr_file(host).read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1].strip() if lines else ""

    # -- rules ---------------------------------------------------------------------------------
    def apply_rules(self, rulesets: Ruleset | Mapping[str, Ruleset]) -> None:
        """Replace the ruleset of each named node (a single Ruleset: the first firewall node's).

        A node may be a firewall node or any host (a host firewall). A traced node's monitor is
        restarted around the change (appending to its trace) with the trace table loaded after
        the new rules: a ruleset flushes the node's tables, and a monitor only names the rules
        that existed when it started.
        """
        if isinstance(rulesets, Ruleset):
            rulesets = {self.topology.firewall: rulesets}
        rulesets = dict(rulesets)
        known = {fw.name for fw in self.topology.firewalls} | {h.name for h in self.topology.hosts}
        unknown = sorted(set(rulesets) - known)
        if unknown:
            raise LabError(f"cannot apply rules to {', '.join(unknown)}: not a node of topology {self.topology.name} "
                           f"(rule nodes: {', '.join(self.rule_nodes)})")
        for name, ruleset in rulesets.items():
            node = self.net.get(name)
            traced = name in self._monitors
            if traced:  # the monitor knows the rules it started with: a new one names the new rules
                monitor = self._monitors.pop(name)
                self.trace_lost[name] = self.trace_lost.get(name, 0) + _drain_trace_listener(monitor)
                _terminate(monitor)
            for argv, stdin in apply_commands(ruleset):
                self._node_cmd(node, argv, stdin, what=ruleset.source)
            self.nft_load(name, EGRESS_TABLE)  # the ruleset flushed it: nothing leaves the lab meanwhile either
            self.rulesets[name] = ruleset
            if traced:
                self._start_monitor(name, mode="a")

    def _node_cmd(self, node, argv, stdin=None, what="firewall") -> str:
        proc = node.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=self._env())
        try:
            out, err = proc.communicate(stdin, timeout=COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise LabError(f"applying {what} on node {node.name} timed out: {argv[0]}") from None
        if proc.returncode != 0:
            first = next((l for l in err.splitlines() if l.strip()), "failed")
            raise LabError(f"applying {what} on node {node.name} failed: {argv[0]}: {first}")
        return out

    def nft(self, node: str, args: list[str], json: bool = False, handles: bool = False) -> str:
        """`nft [-j] [-a] ARGS...` inside a node; its output."""
        argv = ["nft"] + (["-j"] if json else []) + (["-a"] if handles else []) + list(args)
        return self._node_cmd(self.net.get(node), argv, what=" ".join(argv))

    def nft_load(self, node: str, text: str) -> None:
        """`nft -f -` inside a node: add tables or commands to whatever it holds."""
        self._node_cmd(self.net.get(node), ["nft", "-f", "-"], text, what="nft commands")

    def rule_listing(self, node: str) -> str:
        """The node's whole ruleset as the kernel holds it: `nft -j -a list ruleset`."""
        return self.nft(node, ["list", "ruleset"], json=True, handles=True)

    # -- tracing: the firewall's own record of which rule decided ---------------------------------
    def trace_file(self, node: str) -> Path:
        return self.run_dir / f"{node}.trace"

    def start_trace(self, nodes=None) -> None:
        """Trace first packets on each node (default: every rule node) until stop_trace.

        Loads the trace table after the node's rules and starts `nft -a monitor trace` in the
        node's namespace, writing to <run_dir>/<node>.trace; returns once every monitor has
        joined the kernel's trace group, so no event of what follows is missed.
        """
        if self._monitors:
            raise LabError(f"tracing already runs on {', '.join(self._monitors)}: stop_trace first")
        nodes = list(self.rule_nodes if nodes is None else nodes)
        self.trace_lost = {}
        try:
            for name in nodes:
                self._start_monitor(name)
        except BaseException:
            self._end_trace()
            raise

    def _start_monitor(self, name: str, mode: str = "w") -> None:
        self.nft_load(name, TRACE_TABLE)
        with open(self.trace_file(name), mode) as out:
            # nft flushes its output after every event (measured), so a plain file will do
            proc = self.net.get(name).popen(list(MONITOR_COMMAND), stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=subprocess.STDOUT, env=self._env())
        self._monitors[name] = proc
        self._record_state()
        _await_trace_listener(name, proc)
        self.trace_buffer[name] = _enlarge_trace_buffer(proc.pid)

    def stop_trace(self) -> dict[str, str]:
        """Stop the monitors once they wrote every queued event, unload the trace table; node -> trace text.

        `trace_lost` then says how many events each node's monitor lost (0: the trace is complete).
        """
        if not self._monitors:
            return {}
        try:
            for name, proc in self._monitors.items():
                self.trace_lost[name] = self.trace_lost.get(name, 0) + _drain_trace_listener(proc)
        finally:
            nodes = self._end_trace()
        return {name: self.trace_file(name).read_text(errors="replace") for name in nodes}

    def _end_trace(self) -> list[str]:
        nodes = list(self._monitors)
        for proc in self._monitors.values():
            _terminate(proc)
        self._monitors.clear()
        self._record_state()
        for name in nodes:
            node = self.net.get(name)
            listed = self._node_cmd(node, ["nft", "list", "tables"], what="nft list tables")
            if f"table inet {TRACE_TABLE_NAME}" in (line.strip() for line in listed.splitlines()):
                self._node_cmd(node, ["nft", "delete", "table", "inet", TRACE_TABLE_NAME], what="trace table")
        return nodes

    # -- probes ------------------------------------------------------------------------------------
    def _control_socket(self, host: str) -> Path:
        return self.run_dir / f"{host}.ctl"

    def _control(self, host: str, job: jobs.Job) -> jobs.Reply:
        """One job to a host's daemon over its control socket (emulator.jobs); JobError when it cannot answer."""
        if not self.daemon_alive(host):
            why = self.dead_daemons().get(host, "no daemon")
            return jobs.JobError(f"its daemon is not running ({why})")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as control:
                control.settimeout(PROBE_JOB_TIMEOUT)
                control.connect(str(self._control_socket(host)))
                control.sendall(job.to_line())
                reply = control.makefile("rb").readline()
        except OSError as exc:
            return jobs.JobError(f"control socket: {exc.strerror or exc}")
        if not reply:
            return jobs.JobError("the daemon closed the control socket")
        return jobs.parse_reply(reply)

    def run_probes(self, targets_by_host: dict[str, list[ProbeTarget]], cap: int = schedule.HOST_IN_FLIGHT,
                   unanswered: frozenset[str] = frozenset()) -> dict[str, ProbeResult]:
        """Every host probes from inside its namespace (its daemon does), in jobs spread so that no
        host has more than `cap` probes in flight as client or server (emulator.schedule), the ids
        `unanswered` (their first packet is dropped) not counted.

        A host whose daemon cannot run a job gets outcome 'error' on each of its targets (a lab
        fault on those checks), the other hosts' results stand.
        """
        def run(job: schedule.Job) -> list[ProbeResult]:
            reply = self._control(job.client, jobs.ProbeJob(job.targets, len(job.targets)))
            if isinstance(reply, jobs.ProbeReply) and len(reply.results) == len(job.targets):
                return list(reply.results)
            why = reply.error if isinstance(reply, jobs.JobError) else "its daemon answered another job"
            detail = f"prober on {job.client} unavailable: {why}"
            return [ProbeResult(t.id, "error", 0.0, detail=detail) for t in job.targets]

        addresses = {h.name: h.address for h in self.topology.hosts}
        probe_jobs = schedule.make_jobs({h: t for h, t in targets_by_host.items() if t}, addresses,
                                        unanswered=unanswered)
        return {r.id: r for r in schedule.run_jobs(probe_jobs, run, cap)}

    def run_knocks(self, plan: Mapping[str, list]) -> list[str]:
        """Each host sends the first packet of a connection to each of its [address, transport, port]; the errors."""
        def run(host: str) -> list[str]:
            reply = self._control(host, jobs.KnockJob(tuple(tuple(k) for k in plan[host])))
            if not isinstance(reply, jobs.KnockReply):
                why = reply.error if isinstance(reply, jobs.JobError) else "its daemon answered another job"
                return [f"knocks from {host} unavailable: {why}"]
            return [f"{host}: {e}" for e in reply.errors]

        hosts = [h for h, knocks in plan.items() if knocks]
        errors: list[str] = []
        for batch in _each(run, hosts):
            errors += batch
        return errors

    def documents(self, host: str, name: str = "") -> list:
        """What a host's stubs received and its probes created (emulator.protocols.jobstore), by name or all;
        a LabError when its daemon cannot say."""
        reply = self._control(host, jobs.StoreQuery(name))
        if isinstance(reply, jobs.StoreReply):
            return list(reply.documents)
        why = reply.error if isinstance(reply, jobs.JobError) else "its daemon answered another job"
        raise LabError(f"the documents {host} holds cannot be read: {why}")

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

    def popen(self, node: str, argv: list[str], **kwargs) -> subprocess.Popen:
        """A process in a lab node that this run owns: marked with the run, recorded in its state (so
        `safeq-lab clean` ends it after a kill) and stopped with the lab if still running."""
        proc = self.node(node).popen(argv, env={**kwargs.pop("env", os.environ), state.RUN_ENV: str(self.run_dir)},
                                     **kwargs)
        self._helpers.append(proc)
        self._record_state()
        return proc

    def node(self, name: str):
        return self.net.get(name)

    def console(self, script: str | None = None) -> None:
        """Mininet's CLI on this lab (`<host> <command>` runs inside the host), or the commands of `script`."""
        from mininet.cli import CLI
        from mininet.log import setLogLevel

        class LabCLI(CLI):
            identchars = CLI.identchars + "-"  # host names like mfd-0999 start a command, as `h1 ping` does

        setLogLevel("output")  # the CLI prints host command output at this level
        try:
            if script is None:
                LabCLI(self.net)
            else:
                with open(os.devnull) as nothing:  # Mininet polls stdin even when it runs a script
                    LabCLI(self.net, stdin=nothing, script=script)
        finally:
            setLogLevel("error")


def _delete_links(names: list[str]) -> subprocess.Popen | None:
    """`ip link del` of each link in the host's namespace, in one `ip -batch` started now (None: no link)."""
    return _ip_batch([f"link del {name}" for name in names], force=True) if names else None


def _each_shell(nodes: list, send: Callable, what: str = "") -> None:
    """`send` a command to each node's shell, then read every answer: the shells work at once. With
    `what`, a node that answered anything failed (the lab's commands print nothing when they succeed)."""
    for node in nodes:
        send(node)
    answers = [(node, node.waitOutput().strip()) for node in nodes]
    failed = [(node, answer) for node, answer in answers if answer]
    if what and failed:
        node, answer = failed[0]
        raise LabError(f"{what} failed on node {node.name}: {answer.splitlines()[0]}")


def _create_links(net, veths: list[Veth]) -> subprocess.Popen:
    """Every bridge and veth pair in one `ip -batch` of the host's namespace, IPv6 disabled on those
    ending there before any is up; then another batch, started and returned, attaches each port to its
    bridge and brings both up. A pair is created with each end in its node's namespace (Mininet's own
    MAC addresses: its view stays right)."""
    bridges = [node.name for node in net.switches]
    lines = [f"link add name {bridge} type bridge" for bridge in bridges]
    for veth in veths:
        veth.macs = (net.randMac(), net.randMac())
        lines.append(f"link add name {veth.name1} address {veth.macs[0]}{_netns(veth.node1)} "
                     f"type veth peer name {veth.name2} address {veth.macs[1]}{_netns(veth.node2)}")
    _batch_done(_ip_batch(lines), "creating the lab's links")
    ports = [veth for veth in veths if not veth.node2.inNamespace]
    for name in bridges + [veth.name2 for veth in ports]:
        _disable_ipv6(name)
    return _ip_batch([f"link set dev {veth.name2} master {veth.node2.name} up" for veth in ports]
                     + [f"link set dev {bridge} up" for bridge in bridges])


def _netns(node) -> str:
    return f" netns {node.pid}" if node.inNamespace else ""


def _ip_batch(lines: list[str], force: bool = False) -> subprocess.Popen:
    """`ip -batch -` of `lines` in the host's namespace, started now: `_batch_done` waits for it. With
    `force`, ip goes on past a failing line (a link already gone), and nobody reads its errors."""
    proc = subprocess.Popen(["ip", *(["-force"] if force else []), "-batch", "-"], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL if force else subprocess.PIPE,
                            text=True)
    try:
        proc.stdin.write("".join(f"{line}\n" for line in lines))
        proc.stdin.close()
    except BrokenPipeError:
        pass  # it stopped at a failing line (and says which on stderr)
    return proc


def _batch_done(proc: subprocess.Popen, what: str) -> None:
    err = proc.stderr.read()  # a line or two at most: without -force, ip stops at the first failure
    proc.stderr.close()
    if proc.wait() != 0:
        raise LabError(f"{what} failed: {next((l for l in err.splitlines() if l.strip()), 'ip -batch failed')}")


def _each(fn: Callable, items: list) -> list:
    """fn over items, one thread each; an interrupt does not wait for the threads (teardown ends
    their daemons, which ends their jobs)."""
    pool = ThreadPoolExecutor(max_workers=max(1, len(items)))
    try:
        return list(pool.map(fn, items))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _trace_sockets(pid: int) -> list[dict]:
    """The netfilter netlink sockets of the process's namespace that joined the trace group."""
    found = []
    try:
        lines = Path(f"/proc/{pid}/net/netlink").read_text().splitlines()
    except OSError:
        return found
    bit = 1 << (NFNLGRP_NFTRACE - 1)
    for line in lines[1:]:
        cols = line.split()
        # sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode
        if len(cols) >= 10 and int(cols[1]) == NETLINK_NETFILTER and int(cols[3], 16) & bit:
            found.append({"portid": int(cols[2]), "rmem": int(cols[4]), "drops": int(cols[8]), "inode": int(cols[9])})
    return found


def _enlarge_trace_buffer(pid: int, size: int = TRACE_BUFFER) -> bool:
    """Raise the receive buffer of the monitor's trace socket (nft offers no option); False if it could not."""
    inodes = {f"socket:[{s['inode']}]" for s in _trace_sockets(pid)}
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return False
    enlarged = False
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") not in inodes:
                    continue
            except OSError:
                continue
            ours = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(fd), 0)
            if ours < 0:
                return False
            with socket.socket(fileno=ours) as sock:  # a second descriptor of the monitor's socket
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
            enlarged = True
    finally:
        os.close(pidfd)
    return enlarged


def _await_trace_listener(node: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + TRACE_LISTEN_TIMEOUT
    while not _trace_sockets(proc.pid):
        if proc.poll() is not None:
            raise LabError(f"nft monitor trace on {node} exited with status {proc.returncode}")
        if time.monotonic() > deadline:
            raise LabError(f"nft monitor trace on {node} did not start listening within {TRACE_LISTEN_TIMEOUT:.0f}s")
        time.sleep(0.005)


def _drain_trace_listener(proc: subprocess.Popen) -> int:
    """Wait until the kernel holds no more events for the monitor and it is idle; the events it lost.

    Gives up only when nothing moved for TRACE_DRAIN_TIMEOUT (a large burst takes seconds to write).
    """
    deadline, idle, last, lost = time.monotonic() + TRACE_DRAIN_TIMEOUT, 0, None, 0
    while proc.poll() is None and time.monotonic() < deadline and idle < 2:
        sockets = _trace_sockets(proc.pid)
        queued = sum(s["rmem"] for s in sockets)
        lost = sum(s["drops"] for s in sockets)
        idle = idle + 1 if queued == 0 and _sleeping(proc.pid) else 0
        if queued != last:
            deadline, last = time.monotonic() + TRACE_DRAIN_TIMEOUT, queued
        time.sleep(0.01)
    return lost


def _sleeping(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "S"
    except (OSError, IndexError):
        return False


def _link_params(shape: LinkShape, host: str = "", zone: str = "") -> dict:
    """A single host's link (TCLink): bandwidth only; delay, jitter and loss belong on its zone's link."""
    if shape.delayed or shape.loss:
        raise LabError(f"host {host}'s link sets delay, jitter or loss: only bw is applied per host; "
                       f"put them on zone {zone}'s link, where a shaper node applies them")
    return {"bw": shape.bw} if shape.bw is not None else {}


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
