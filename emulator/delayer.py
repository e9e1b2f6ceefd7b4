"""Delay and jitter without sch_netem: hold each queued packet, then accept it, in order.

`python -m emulator.delayer --queues N,M --delay-ms D --jitter-ms J` runs inside a shaper's
namespace (emulator.impair), bound to NFQUEUE queues N and M (one per direction; iptables sends
the shaper's forwarded IPv4 there). Each direction holds a packet delay/2 ± jitter/2 (uniform)
and never lets it overtake the packet ahead of it; the hold is measured from the moment the
packet is read from the queue, with select() timeouts in microseconds (about 0.1 ms precise).

Nothing is dropped silently: each queue is bounded in the kernel (QUEUE_MAX packets, held ones
included); what the kernel drops when it is full, or when the delayer cannot keep up, is counted
there (/proc/net/netfilter/nfnetlink_queue) and reported by `stats`.

Control, one line each on stdin: a JSON object {"delay_ms": D, "jitter_ms": J} replaces the
delay (answered `OK`), `stats` answers one JSON line of counters. Stdout says `READY` once both
queues are bound. End of stdin: the held packets are released when due, the counters are
written, and it exits. SIGTERM exits at once (the kernel drops what was still held).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import select
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field

QUEUE_MAX = 8192  # packets one direction may hold (the kernel's queue length)
QUEUE_STATS = "/proc/net/netfilter/nfnetlink_queue"
PR_SET_TIMERSLACK = 29
REALTIME_PRIORITY = 10  # SCHED_FIFO: above every ordinary process, below the kernel's own threads (50)


# -- the timing, as pure functions -----------------------------------------------------------------
def hold_seconds(delay_ms: float, jitter_ms: float, uniform: float) -> float:
    """One direction's hold for a packet: delay/2 + (uniform - 1/2) * jitter, uniform in [0, 1); never negative."""
    return max(0.0, delay_ms / 2 + (uniform - 0.5) * jitter_ms) / 1000


def release_at(arrival: float, hold: float, previous_release: float) -> float:
    """When a packet leaves: after its hold, and never before the packet ahead of it (no reordering)."""
    return max(arrival + hold, previous_release)


@dataclass
class Direction:
    """One direction's held packets in arrival order; their release times never decrease, so a FIFO suffices."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    held: deque = field(default_factory=deque)  # (release time, packet)
    last_release: float = 0.0
    admitted: int = 0
    released: int = 0
    most_held: int = 0
    late_total: float = 0.0  # seconds packets left after their release time, summed
    late_most: float = 0.0

    def admit(self, packet, now: float, uniform: float) -> float:
        self.last_release = release_at(now, hold_seconds(self.delay_ms, self.jitter_ms, uniform), self.last_release)
        self.held.append((self.last_release, packet))
        self.admitted += 1
        self.most_held = max(self.most_held, len(self.held))
        return self.last_release

    def due(self, now: float) -> list:
        """The packets whose time has come, in order (removed from the held ones)."""
        out = []
        while self.held and self.held[0][0] <= now:
            due, packet = self.held.popleft()
            self.late_total += now - due
            self.late_most = max(self.late_most, now - due)
            out.append(packet)
        self.released += len(out)
        return out

    def next_due(self) -> float | None:
        return self.held[0][0] if self.held else None


def kernel_drops(text: str, queue_numbers) -> dict[int, int]:
    """queue -> packets the kernel dropped (queue full + could not reach the delayer), from QUEUE_STATS."""
    drops = {}
    for line in text.splitlines():
        cols = line.split()
        # queue_number peer_portid queue_total copy_mode copy_range queue_dropped user_dropped id_sequence 1
        if len(cols) >= 7 and cols[0].isdigit() and int(cols[0]) in queue_numbers:
            drops[int(cols[0])] = int(cols[5]) + int(cols[6])
    return drops


def next_timeout(directions, now: float) -> float | None:
    dues = [d for d in (direction.next_due() for direction in directions) if d is not None]
    return max(0.0, min(dues) - now) if dues else None


# -- the process -------------------------------------------------------------------------------------
def _stats(directions: dict[int, Direction]) -> dict:
    try:
        text = open(QUEUE_STATS).read()
    except OSError:
        text = ""
    drops = kernel_drops(text, directions)
    return {str(q): {"admitted": d.admitted, "released": d.released, "held": len(d.held), "most_held": d.most_held,
                     "dropped": drops.get(q, 0), "late_ms_mean": round(1000 * d.late_total / max(1, d.released), 3),
                     "late_ms_most": round(1000 * d.late_most, 3)} for q, d in directions.items()}


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _configure(directions, delay_ms: float, jitter_ms: float) -> None:
    for direction in directions:
        direction.delay_ms, direction.jitter_ms = delay_ms, jitter_ms


def run(queue_numbers: list[int], delay_ms: float, jitter_ms: float, seed: int | None) -> int:
    from netfilterqueue import COPY_META, NetfilterQueue  # root-only, inside a namespace: imported where used

    rng = random.Random(seed)
    directions = {q: Direction(delay_ms, jitter_ms) for q in queue_numbers}
    bound = []
    for number, direction in directions.items():
        nfq = NetfilterQueue()

        def admit(packet, direction=direction):
            direction.admit(packet, time.monotonic(), rng.random())

        nfq.bind(number, admit, max_len=QUEUE_MAX, mode=COPY_META)
        bound.append(nfq)
    fds = {nfq.get_fd(): nfq for nfq in bound}
    _say("READY")
    pending = b""
    draining = False
    while True:
        now = time.monotonic()
        for direction in directions.values():
            for packet in direction.due(now):
                packet.accept()
        timeout = next_timeout(directions.values(), time.monotonic())
        if draining and timeout is None:
            break
        readable, _, _ = select.select(list(fds) + ([] if draining else [0]), [], [], timeout)
        for fd in readable:
            if fd in fds:
                fds[fd].run(block=False)
                continue
            chunk = os.read(0, 4096)
            if not chunk:
                draining = True  # the lab removed the queue rules first: only held packets remain
                continue
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                _command(line.decode(errors="replace").strip(), directions)
    _say(json.dumps(_stats(directions)))
    for nfq in bound:
        nfq.unbind()
    return 0


def _command(line: str, directions: dict[int, Direction]) -> None:
    if not line:
        return
    if line == "stats":
        _say(json.dumps(_stats(directions)))
        return
    try:
        config = json.loads(line)
        _configure(directions.values(), float(config.get("delay_ms") or 0), float(config.get("jitter_ms") or 0))
    except (ValueError, TypeError, AttributeError) as exc:
        _say(f"ERROR {exc}")
        return
    _say("OK")


def _tight_timers() -> None:
    """Wake up when select's timeout ends, not up to the default 50 us later (prctl PR_SET_TIMERSLACK)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the default slack only costs precision


def _realtime() -> None:
    """Run before ordinary processes: on a busy machine a hold must not end a scheduler slice late.

    The loop blocks in select() between packets, so a real-time policy cannot starve the machine;
    the kernel's RT throttling (sched_rt_runtime_us) bounds it anyway.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(REALTIME_PRIORITY))
    except (OSError, AttributeError):
        pass  # not root or not Linux: ordinary scheduling, lateness shows in `stats`


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emulator.delayer", description=__doc__.splitlines()[0])
    parser.add_argument("--queues", required=True, help="NFQUEUE numbers, comma-separated (one per direction)")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="added round-trip time (each direction holds half)")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="spread of the round-trip time (± this)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the jitter's random numbers")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    _tight_timers()
    _realtime()
    try:
        queue_numbers = [int(q) for q in args.queues.split(",")]
    except ValueError:
        parser.error(f"--queues {args.queues!r}: give queue numbers such as 4,5")
    return run(queue_numbers, args.delay_ms, args.jitter_ms, args.seed)


if __name__ == "__main__":
    sys.exit(main())
