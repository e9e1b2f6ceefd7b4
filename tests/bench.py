"""Benchmark: full audits of topologies (default single-site and fleet-200), timed per phase, with
peak memory, against nmap over the same (host, port) pairs.

`tox -e bench` (root). Prints a table; numbers are measurements, nothing is asserted here.
"""
from __future__ import annotations

import argparse
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import roles
from emulator import rules
from emulator.audit import probe_targets, run_audit
from emulator.catalog import load_catalog
from emulator.lab import Lab
from emulator.plan import audit_plan
from emulator.state import _our_processes
from emulator.topology import load_topology


def _mem_available_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    return 0


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class MemorySampler(threading.Thread):
    """Samples the machine's used memory and the lab processes' summed PSS (shared pages split fairly)."""

    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True)
        self.interval, self.baseline = interval, _mem_available_kib()
        self.peak_used = self.peak_pss = 0
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.is_set():
            self.peak_used = max(self.peak_used, self.baseline - _mem_available_kib())
            self.peak_pss = max(self.peak_pss, sum(_pss_kib(p) for p in _our_processes()))
            self.stopping.wait(self.interval)

    def stop(self):
        self.stopping.set()
        self.join()


# nmap waits out its retransmissions on every dropped port, one server after another: through a
# default-drop firewall a fleet's site servers would take many minutes
NMAP_LIMIT = 120.0


def nmap_seconds(lab, targets: dict[str, list], limit: float | None = NMAP_LIMIT) -> tuple[float, int, bool]:
    """`nmap -sT -T4` from each client host over exactly the TCP (server, port) pairs it probes: one
    nmap per (client, server), a client's runs in sequence, all clients at once. (seconds, pairs,
    whether every nmap ended within `limit`: if not, they are killed and the seconds are `limit`;
    None: no limit)"""
    commands, pairs = {}, 0
    for host, host_targets in targets.items():
        by_server: dict[str, set[int]] = {}
        for target in host_targets:
            if target.transport == "tcp":
                by_server.setdefault(target.host, set()).add(target.port)
        pairs += sum(map(len, by_server.values()))
        if by_server:
            commands[host] = "; ".join(f"nmap -sT -T4 -Pn -n -oG - -p {','.join(map(str, sorted(ports)))} {server}"
                                       for server, ports in sorted(by_server.items()))
    started = time.monotonic()
    procs = [lab.node(host).popen(["sh", "-c", command], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for host, command in commands.items()]
    deadline = started + limit if limit is not None else None
    finished = True
    for proc in procs:
        try:
            proc.wait(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            finished = False
            os.killpg(proc.pid, signal.SIGKILL)  # mnexec -d made each shell its own session leader
            proc.wait()
    return (time.monotonic() - started if finished else limit), pairs, finished


# stateful and default-drop with no accept at all: every required flow is dropped
DEFAULT_DROP = """*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
"""


def bench(topology_name: str, run: int, catalog) -> tuple:
    topology = load_topology(topology_name)
    checks = audit_plan(catalog, topology)
    generated = rules.generate(topology, checks)
    drop = rules.Ruleset("iptables", DEFAULT_DROP, "default drop")
    sampler = MemorySampler()
    sampler.start()
    started = time.monotonic()
    with Lab(topology, catalog) as lab:
        listeners = sum(len(roles.daemon_spec(h.name, h.roles, None, catalog)["listeners"]) for h in topology.hosts)
        daemons = len(lab.zygote.pids())
        audits, nmaps = [], []
        for ruleset in (generated, drop):  # nmap through the same firewall as the audit before it
            lab.apply_rules(ruleset)
            audits.append(run_audit(lab, checks, ruleset.source, rulesets={topology.firewall: ruleset}))
            # nmap through passing rules ends by itself; through dropping ones it is bounded
            nmaps.append(nmap_seconds(lab, probe_targets(checks, topology), NMAP_LIMIT if ruleset is drop else None))
    total = time.monotonic() - started
    sampler.stop()
    good, closed = audits
    hosts = len(topology.hosts)
    return (topology.name, run, hosts, daemons, listeners, sum(c.kind == "required" for c in checks),
            sum(c.kind == "exposure" for c in checks), lab.timings["build"], lab.timings["zygote wait"],
            lab.timings["start"], 1000 * lab.timings["start"] / hosts, good.timings["probe"], good.timings["sweep"],
            good.timings["attribute"], closed.timings["probe"], closed.timings["sweep"],
            closed.timings["attribute"], lab.timings["teardown"], total,
            sampler.peak_used / 1024, sampler.peak_pss / 1024, sampler.peak_pss / 1024 / hosts, nmaps[0][1],
            *[x for audit, nmap in zip(audits, nmaps) for x in _versus_nmap(audit.timings["probe"], *nmap)],
            f"{good.exit_status}/{closed.exit_status}")


def _versus_nmap(probe: float, nmap: float, _pairs: int, finished: bool) -> tuple:
    """(nmap's seconds, probe/nmap), as bounds when nmap was stopped at its limit."""
    if finished:
        return nmap, probe / nmap if nmap else 0.0
    return f">{nmap:.0f}", f"<{probe / nmap:.2f}"


HEADER = ("topology", "run", "hosts", "daemon processes", "listeners", "required", "knocks", "build s", "zygote wait s", "start s",
          "start ms/host",
          "probe s (generated)", "sweep s (generated)", "attribute s (generated)", "probe s (default drop)",
          "sweep s (default drop)", "attribute s (default drop)",
          "teardown s", "total s", "peak used MiB", "peak lab PSS MiB", "PSS MiB/host", "nmap tcp pairs",
          "nmap s (generated)", "probe/nmap (generated)", "nmap s (default drop)", "probe/nmap (default drop)",
          "exit status (gen/drop)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench")
    parser.add_argument("--topology", action="append", help="repeatable; default: single-site and fleet-200")
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args(argv)
    catalog = load_catalog()
    rows = [bench(name, run, catalog) for name in (args.topology or ["single-site", "fleet-200"])
            for run in range(1, args.runs + 1)]
    print("\nfull audits (generated rules, then default drop), each followed by nmap over the audit's TCP probe pairs")
    for name, row in zip(HEADER, zip(*rows)):  # one column per run: the table stays readable
        print(f"{name:24} " + " ".join(f"{v:>14.2f}" if isinstance(v, float) else f"{v!s:>14}" for v in row))
    print(f"bench process max RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
