"""Probe jobs: one client to one server each, and never more than `cap` probes in flight per host."""
from __future__ import annotations

import threading
import time
from collections import Counter

from emulator.protocols.base import ProbeTarget
from emulator.schedule import make_jobs, run_jobs


def _targets(server: str, count: int, start: int = 0) -> list[ProbeTarget]:
    return [ProbeTarget(id=f"{server}-{start + i}", host=server, transport="tcp", protocol="raw", port=9100)
            for i in range(count)]


ADDRESSES = {f"d{i}": f"198.18.1.{i}" for i in range(40)} | {"site1": "198.18.0.1"}


def test_jobs_are_one_client_to_one_server_at_most_size_long_clients_in_turn():
    by_host = {"d0": _targets("198.18.0.1", 70) + _targets("198.18.0.2", 3), "d1": _targets("198.18.0.1", 5)}
    jobs = make_jobs(by_host, ADDRESSES, size=32)
    assert [(j.client, j.server_address, len(j.targets)) for j in jobs] == [
        ("d0", "198.18.0.1", 32), ("d1", "198.18.0.1", 5), ("d0", "198.18.0.1", 32), ("d0", "198.18.0.1", 6),
        ("d0", "198.18.0.2", 3)]
    assert sorted(t.id for j in jobs for t in j.targets) == sorted(t.id for ts in by_host.values() for t in ts)


def test_no_host_ever_has_more_than_cap_probes_in_flight_and_every_result_comes_back():
    # forty devices all probing site1, and site1 probing every device: site1 is the bottleneck
    by_host = {d: _targets("198.18.0.1", 20, 100 * i) for i, d in enumerate(ADDRESSES) if d != "site1"}
    by_host["site1"] = [t for i in range(40) for t in _targets(f"198.18.1.{i}", 2, 1000 * i)]
    jobs = make_jobs(by_host, ADDRESSES, size=8)
    lock, busy, peak = threading.Lock(), Counter(), Counter()

    def execute(job):
        with lock:
            for host in set(job.hosts):
                busy[host] += len(job.targets)
                peak[host] = max(peak[host], busy[host])
        time.sleep(0.002)
        with lock:
            for host in set(job.hosts):
                busy[host] -= len(job.targets)
        return [t.id for t in job.targets]

    results = run_jobs(jobs, execute, cap=16, workers=32)
    assert sorted(results) == sorted(t.id for ts in by_host.values() for t in ts)
    assert max(peak.values()) <= 16 and peak["198.18.0.1"] == 16  # the cap is reached, never passed


def test_a_job_larger_than_the_cap_still_runs_alone():
    jobs = make_jobs({"d0": _targets("198.18.0.1", 10)}, ADDRESSES, size=10)
    assert run_jobs(jobs, lambda job: [len(job.targets)], cap=4) == [10]


def test_unanswered_probes_are_free_and_start_at_once():
    by_host = {"d0": _targets("198.18.0.1", 40)}
    unanswered = frozenset(t.id for t in by_host["d0"][:30])
    jobs = make_jobs(by_host, ADDRESSES, size=8, unanswered=unanswered)
    assert sorted((j.counted, len(j.targets)) for j in jobs) == [(False, 6), (False, 8), (False, 8), (False, 8),
                                                                 (True, 2), (True, 8)]
    lock, running, peak = threading.Lock(), [0], [0]

    def execute(job):
        with lock:
            running[0] += len(job.targets)
            peak[0] = max(peak[0], running[0])
        time.sleep(0.01)
        with lock:
            running[0] -= len(job.targets)
        return [t.id for t in job.targets]

    assert len(run_jobs(jobs, execute, cap=8, workers=16)) == 40
    assert peak[0] > 8  # the uncounted jobs ran alongside the counted ones
