"""Benchmark: a full audit of a topology (default single-site), timed per phase, with peak memory.

`tox -e bench` (root). Prints a table; numbers are measurements, nothing is asserted here.
"""
from __future__ import annotations

import argparse
import resource
import sys
import threading
import time
from pathlib import Path

from emulator import rules
from emulator.audit import run_audit
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


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class MemorySampler(threading.Thread):
    """Samples the machine's used memory and the lab processes' summed RSS."""

    def __init__(self, interval: float = 0.2):
        super().__init__(daemon=True)
        self.interval, self.baseline = interval, _mem_available_kib()
        self.peak_used = self.peak_rss = 0
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.is_set():
            self.peak_used = max(self.peak_used, self.baseline - _mem_available_kib())
            self.peak_rss = max(self.peak_rss, sum(_rss_kib(p) for p in _our_processes()))
            self.stopping.wait(self.interval)

    def stop(self):
        self.stopping.set()
        self.join()


# stateful and default-drop with no accept at all: every required flow is dropped
DEFAULT_DROP = """*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench")
    parser.add_argument("--topology", default="single-site")
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args(argv)
    catalog = load_catalog()
    topology = load_topology(args.topology)
    checks = audit_plan(catalog, topology)
    generated = rules.generate(topology, checks)
    drop = rules.Ruleset("iptables", DEFAULT_DROP, "default drop")
    rows = []
    for run in range(1, args.runs + 1):
        sampler = MemorySampler()
        sampler.start()
        started = time.monotonic()
        with Lab(topology, catalog) as lab:
            audits = []
            for ruleset in (generated, drop):
                lab.apply_rules(ruleset)
                audits.append(run_audit(lab, checks, ruleset.source, rulesets={topology.firewall: ruleset}))
        total = time.monotonic() - started
        sampler.stop()
        good, closed = audits
        rows.append((run, len(topology.hosts), sum(c.kind == "required" for c in checks),
                     sum(c.kind == "exposure" for c in checks), lab.timings["build"], lab.timings["start"],
                     good.timings["probe"], good.timings["sweep"], closed.timings["probe"], closed.timings["sweep"],
                     lab.timings["teardown"], total, sampler.peak_used / 1024, sampler.peak_rss / 1024,
                     f"{good.exit_status}/{closed.exit_status}"))
    header = ("run", "hosts", "required", "knocks", "build s", "start s", "probe s (generated)", "sweep s (generated)",
              "probe s (default drop)", "sweep s (default drop)", "teardown s", "total s",
              "peak used MiB", "peak lab RSS MiB", "exit")
    print(f"\nfull audits of topology {topology.name} ({len(checks)} checks), generated rules then default drop")
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row))
    print(f"bench process max RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
