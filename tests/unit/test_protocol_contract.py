"""Contract over every registered protocol: each catalog (protocol, transport, security) the lab
serves starts in a real role daemon, answers its own probe, survives garbage, and answers again."""
from __future__ import annotations

import json
import socket
import subprocess
import sys


import roles as role_data
from emulator import pki
from emulator.catalog import load_catalog
from emulator.protocols import module_for
from tests.support import run_stub

GARBAGE = b"\x00\xff\x16\x03GARBAGE \r\n\r\n" * 64


def served_kinds():
    kinds = set()
    for flow in load_catalog().flows:
        for ep in flow.endpoints:
            if ep.channel == "service" and ep.port is not None and module_for(ep.protocol).listen is not None:
                kinds.add((ep.protocol, ep.transport, ep.security))
    return sorted(kinds)


def distinct_free_ports(kind, count):
    """Ports free now and distinct from each other (free_port() may hand the same one out twice)."""
    sockets = [socket.socket(socket.AF_INET, kind) for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def probe(targets):
    proc = subprocess.run([sys.executable, "-m", "emulator.prober"], input=json.dumps(targets),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return {r["id"]: r for r in json.loads(proc.stdout)}


def send_garbage(transport, port):
    kind = socket.SOCK_STREAM if transport == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as s:
        s.settimeout(2)
        if transport == "tcp":
            s.connect(("127.0.0.1", port))
            s.sendall(GARBAGE)
            try:
                s.recv(4096)  # an error answer or a close, either is fine
            except OSError:
                pass
        else:
            s.sendto(GARBAGE[:512], ("127.0.0.1", port))


def test_every_served_protocol_answers_its_probe_and_survives_garbage(tmp_path):
    kinds = served_kinds()
    assert {p for p, _t, _s in kinds} >= {"http", "soap", "webdav", "ipp", "ftp", "ldap", "snmp", "lpr", "raw",
                                           "time", "terminal", "discovery", "safeq"}
    material = pki.make_test_pki(tmp_path / "pki", host="stub.lab", address="127.0.0.1")
    listeners, targets = [], []
    ports = {"tcp": distinct_free_ports(socket.SOCK_STREAM, len(kinds)),
             "udp": distinct_free_ports(socket.SOCK_DGRAM, len(kinds))}
    for index, (protocol, transport, security) in enumerate(kinds):
        port = ports[transport][index]
        listeners.append({"transport": transport, "port": port, "protocol": protocol, "security": security})
        targets.append({"id": f"{protocol}/{transport}/{security}", "host": "127.0.0.1", "transport": transport,
                        "protocol": protocol, "port": port, "security": security, "timeout": 10.0,
                        "server_name": "stub.lab", "ca_file": material["ca_file"]})
    roles = ["terminal-server", "spooler-controller", "mfd", "mfd-konica-minolta", "management", "ldap-server",
             "flexispooler", "payment-system", "terminal-ultralight", "user", "mail-server", "workflow-processing-system"]
    # the persona the role layer gives a host of these roles (HTTP surface, device data)
    with run_stub(tmp_path, listeners, persona={**material, "identity": role_data.identity(roles)}, roles=roles):
        before = probe(targets)
        for listener in listeners:
            send_garbage(listener["transport"], listener["port"])
        after = probe(targets)
    failed = {k: (before[k]["outcome"], after[k]["outcome"], after[k]["detail"]) for k in before
              if before[k]["outcome"] != "ok" or after[k]["outcome"] != "ok"}
    assert failed == {}
