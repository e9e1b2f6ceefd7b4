"""Probe jobs spread over the lab so that no host has more than `cap` probes in flight.

Every host's role daemon is one single-threaded process that both serves its ports and runs its
own probes. In a fleet, a thousand devices probe the same two site servers: sent all at once,
the servers' queues outgrow the probe timeout and flows the firewall passed come back `silent`.
So probes go out as jobs of one client to one server (at most `size` probes each), and a job
starts only while both its hosts, counted as client or server alike, stay within `cap`. A
probe's timeout runs from when its daemon starts it, never while its job waits here. Probes
known to go unanswered (a firewall drops their first packet) cost neither host any work: their
jobs are not counted, and start at once.

Pure scheduling: the caller's `execute(job)` talks to the daemons.
"""
from __future__ import annotations

import itertools
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from emulator.protocols.base import ProbeTarget

HOST_IN_FLIGHT = 64  # probes one host's daemon has running, as client and server together
JOB_SIZE = 32
WORKERS = 128  # jobs running at once (threads waiting on control sockets)
LOOKAHEAD = 1024  # waiting jobs looked at for a free host each time a job ends


@dataclass(frozen=True)
class Job:
    client: str  # host name: whose daemon runs the probes
    client_address: str
    server_address: str
    targets: tuple[ProbeTarget, ...]
    counted: bool = True  # False: probes that go unanswered, free for both hosts

    @property
    def hosts(self) -> tuple[str, str]:
        return self.client_address, self.server_address

    @property
    def weight(self) -> int:
        return len(self.targets) if self.counted else 0


def make_jobs(targets_by_host: Mapping[str, Sequence[ProbeTarget]], addresses: Mapping[str, str],
              size: int = JOB_SIZE, unanswered: frozenset[str] = frozenset()) -> list[Job]:
    """One client's probes of one server, `size` at most, the clients taken in turn; the probes
    whose ids are `unanswered` in jobs of their own that are not counted."""
    per_client = []
    for client, targets in targets_by_host.items():
        by_server: dict[tuple[str, bool], list[ProbeTarget]] = defaultdict(list)
        for target in targets:
            by_server[(target.host, target.id not in unanswered)].append(target)
        per_client.append([Job(client, addresses[client], server, tuple(chunk[i:i + size]), counted)
                           for (server, counted), chunk in by_server.items() for i in range(0, len(chunk), size)])
    return [job for round_ in itertools.zip_longest(*per_client) for job in round_ if job is not None]


def run_jobs(jobs: Sequence[Job], execute: Callable[[Job], list], cap: int = HOST_IN_FLIGHT,
             workers: int = WORKERS) -> list:
    """execute(job) for every job, with at most `cap` probes in flight per host; every result, concatenated.

    A job larger than `cap` runs alone on its hosts rather than never."""
    pending = deque(jobs)
    busy: Counter = Counter()
    running: dict[Future, Job] = {}
    results: list = []

    def fits(job: Job) -> bool:
        return all(busy[h] == 0 or busy[h] + job.weight <= cap for h in set(job.hosts))

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(jobs)))) as pool:
        while pending or running:
            waiting = deque()
            for _ in range(min(len(pending), LOOKAHEAD)):
                if len(running) >= workers:
                    break
                job = pending.popleft()
                if fits(job):
                    for host in set(job.hosts):
                        busy[host] += job.weight
                    running[pool.submit(execute, job)] = job
                else:
                    waiting.append(job)
            pending.extendleft(reversed(waiting))  # keep their turn
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                job = running.pop(future)
                for host in set(job.hosts):
                    busy[host] -= job.weight
                results.extend(future.result())
    return results
