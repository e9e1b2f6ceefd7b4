"""Probe runner: checks many flows at once from inside one lab host.

``python -m emulator.prober [--concurrency N] < targets.json > results.json``

Stdin is a JSON list of ProbeTarget objects; stdout is a JSON list of
ProbeResult objects in the same order; exit 0. Unusable input gives one line
``error: ...`` on stderr and exit 2. Probes run concurrently, so a run takes
about the longest timeout (per batch of N), not the sum of them.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import sys
from typing import Any, NoReturn

from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults

from . import protocols
from .protocols.base import ProbeResult, ProbeTarget

DEFAULT_CONCURRENCY = 256  # well under the usual 1024 open-files limit
EXIT_USAGE = 2


def parse_targets(text: str) -> list[ProbeTarget]:
    try:
        data: Any = json.loads(text)
    except ValueError as exc:
        raise ValueError(f'input is not JSON: {exc}') from None
    if not isinstance(data, list):
        raise ValueError(f'input must be a JSON list of probe targets, not {type(data).__name__}')
    targets = []
    for index, item in enumerate(data):
        try:
            targets.append(ProbeTarget.from_dict(item))
        except (ValueError, TypeError) as exc:
            raise ValueError(f'target {index}: {exc}') from None
    return targets


_runs_in_flight = 0  # run_probes calls of this process not finished yet
# A collection of a daemon's whole heap costs milliseconds, and an audit hands a daemon serving
# many hosts hundreds of jobs in a row: the heap is returned once the jobs stop coming.
QUIET_BEFORE_RETURN = 0.5  # seconds with no run in flight
_return_call = None  # the pending return_freed_memory call


def return_freed_memory() -> None:
    """Free the probes' reference cycles, then give the heap's free pages back to the kernel (glibc's
    malloc_trim). A probe's client, its factory and connector form cycles holding the document it
    sent (hundreds of kB): left to the collector's own pace, a daemon kept MiB of them after an
    audit; glibc would keep the freed pages for the rest of the lab's life."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):  # not glibc: nothing to trim this way
        pass


def run_probes(reactor, targets: list[ProbeTarget],
               concurrency: int = DEFAULT_CONCURRENCY) -> Deferred[list[ProbeResult]]:
    """Probe all targets, at most ``concurrency`` at a time; results in input order. When the last
    run in flight ends and no other starts for QUIET_BEFORE_RETURN, the freed heap goes back to
    the kernel."""
    global _runs_in_flight, _return_call
    if concurrency < 1:
        raise ValueError(f'concurrency must be at least 1, got {concurrency}')
    semaphore = DeferredSemaphore(concurrency)
    _runs_in_flight += 1
    if _return_call is not None and _return_call.active():
        _return_call.cancel()

    def ended(outcome):
        global _runs_in_flight, _return_call
        _runs_in_flight -= 1
        if not _runs_in_flight:
            _return_call = reactor.callLater(QUIET_BEFORE_RETURN, return_freed_memory)
        return outcome

    return gatherResults([semaphore.run(protocols.probe, reactor, target) for target in targets],
                         consumeErrors=True).addBoth(ended)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # Same one-line contract as bad input, instead of argparse's usage block.
        self.exit(EXIT_USAGE, f'error: {message}\n')


def _concurrency(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'not an integer: {text!r}') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be at least 1, got {value}')
    return value


def _one_line(text: Any) -> str:
    return ' '.join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog='python -m emulator.prober',
                     description='Probe the targets read on stdin; write results on stdout.')
    parser.add_argument('--concurrency', type=_concurrency, default=DEFAULT_CONCURRENCY,
                        help=f'probes in flight at once (default {DEFAULT_CONCURRENCY})')
    args = parser.parse_args(argv)
    try:
        targets = parse_targets(sys.stdin.read())
    except (ValueError, UnicodeDecodeError) as exc:
        print(f'error: {_one_line(exc)}', file=sys.stderr)
        return EXIT_USAGE

    from twisted.internet import reactor

    reactor.suggestThreadPoolSize(64)  # FTP probes run ftplib in threads: let many run at once

    protocols.preload()

    outcome: list[Any] = []

    def go() -> None:
        d = run_probes(reactor, targets, args.concurrency)
        d.addBoth(outcome.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(go)
    reactor.run()
    if not outcome or not isinstance(outcome[0], list):
        reason = 'interrupted' if not outcome else _one_line(outcome[0].getErrorMessage())
        print(f'error: probe run failed: {reason}', file=sys.stderr)
        return 1
    json.dump([result.to_dict() for result in outcome[0]], sys.stdout, ensure_ascii=False)
    sys.stdout.write('\n')
    sys.stdout.flush()
    return 0


if __name__ == '__main__':
    sys.exit(main())
