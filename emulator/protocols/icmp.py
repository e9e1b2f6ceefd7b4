"""``icmp``: echo request/reply, probe only.

The kernel of every lab host already answers echo requests, so there is no
stub (``listen = None``). The probe runs the system ``ping`` rather than
opening a raw socket, because raw sockets need CAP_NET_RAW while ``ping`` is
set up by its package to work for any user.
"""

from __future__ import annotations

import math
import shutil

from twisted.internet.defer import Deferred, succeed
from twisted.internet.utils import getProcessOutputAndValue

from .base import ProbeResult, ProbeTarget

PROTOCOL_ID = 'icmp'
listen = None
PING_PACKAGE = 'iputils-ping'  # Debian package that ships /usr/bin/ping

# iputils ping exit codes: 0 a reply came back, 1 no reply (including ICMP
# errors such as host unreachable), 2 any other failure (bad address, no
# permission to send, no route at send time).
_PING_NO_REPLY = 1


def _last_line(*texts: bytes) -> str:
    for text in texts:
        lines = [line.strip() for line in text.decode('utf-8', 'replace').splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return ''


def probe(reactor, target: ProbeTarget) -> Deferred[ProbeResult]:
    """Send one echo request with ``ping``; always fires with a ProbeResult."""
    exchange = 'icmp echo'
    if target.transport != 'icmp':
        return succeed(ProbeResult(id=target.id, outcome='error', elapsed=0.0, exchange=exchange,
                                   detail=f'icmp probe needs transport icmp, not {target.transport}'))
    ping = shutil.which('ping')
    if ping is None:
        return succeed(ProbeResult(id=target.id, outcome='error', elapsed=0.0, exchange=exchange,
                                   detail=f'ping not found on PATH: install the Debian package '
                                          f'{PING_PACKAGE}'))
    wait = max(1, math.ceil(target.timeout))  # ping -W takes whole seconds
    started = reactor.seconds()

    def elapsed() -> float:
        return max(0.0, reactor.seconds() - started)

    def finished(out_err_code) -> ProbeResult:
        out, err, code = out_err_code
        if code == 0:
            return ProbeResult(id=target.id, outcome='ok', elapsed=elapsed(), exchange=exchange)
        if code == _PING_NO_REPLY:
            return ProbeResult(id=target.id, outcome='timeout', elapsed=elapsed(), exchange=exchange,
                               detail=_last_line(err, out) or f'no echo reply within {wait} s')
        return ProbeResult(id=target.id, outcome='error', elapsed=elapsed(), exchange=exchange,
                           detail=f'ping exited {code}: {_last_line(err, out)}')

    def failed(failure) -> ProbeResult:
        # getProcessOutputAndValue errbacks with (out, err, signal) on a signal.
        return ProbeResult(id=target.id, outcome='error', elapsed=elapsed(), exchange=exchange,
                           detail=f'ping failed: {failure.getErrorMessage()}')

    # LC_ALL=C keeps ping's messages, copied into detail, in English.
    d = getProcessOutputAndValue(ping, ('-n', '-c', '1', '-W', str(wait), target.host),
                                 env={'LC_ALL': 'C'}, reactor=reactor)
    d.addCallbacks(finished, failed)
    return d
