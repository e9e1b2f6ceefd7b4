"""openssl s_client against every secured port of the catalog, on the real port numbers.

The stubs run inside a throwaway network namespace (`unshare --net`, its own loopback), so the
real ports (443, 636, 5022, ...) never collide with anything on the machine.
"""
import json
import shutil
import subprocess
import sys

import pytest

import roles
from emulator import pki
from emulator.catalog import load_catalog
from emulator.protocols.framed import NOT_TLS

pytestmark = pytest.mark.interop

SCRIPT = r"""
set -u
ip link set lo up
"$PYTHON" -m emulator.roled "$SPEC" > "$DIR/ready" 2> "$DIR/stderr" &
daemon=$!
for i in $(seq 1 200); do grep -q READY "$DIR/ready" 2>/dev/null && break; sleep 0.05; done
for entry in $PORTS; do
  port=${entry%%:*}; starttls=${entry#*:}
  extra=""; [ -n "$starttls" ] && extra="-starttls $starttls"
  if echo Q | timeout 10 openssl s_client -connect 127.0.0.1:$port $extra -CAfile "$CA" -verify_return_error \
       -verify_hostname stub.lab -servername stub.lab > "$DIR/out-$port" 2>&1; then
    echo "$port ok"
  else
    echo "$port fail $(grep -m1 -iE 'verify error|error|errno' "$DIR/out-$port" | tr -d '\n')"
  fi
  if echo Q | timeout 10 openssl s_client -connect 127.0.0.1:$port $extra -CAfile "$OTHER_CA" \
       -verify_return_error -servername stub.lab > /dev/null 2>&1; then
    echo "$port untrusted-accepted"
  fi
done
kill $daemon; wait $daemon
"""


def secured_listeners():
    catalog = load_catalog()
    return [l for l in roles.listeners(list(catalog.roles), catalog)
            if l.transport == "tcp" and l.protocol not in NOT_TLS and l.security in ("tls", "starttls")]


def test_openssl_verifies_every_secured_port(tmp_path):
    assert shutil.which("openssl"), "apt-get install openssl"
    assert shutil.which("unshare"), "apt-get install util-linux"
    listeners = secured_listeners()
    assert len(listeners) > 20
    material = pki.make_test_pki(tmp_path / "pki", host="stub.lab", address="127.0.0.1")
    other = pki.make_test_pki(tmp_path / "other", host="stub.lab")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"host": "stub", "roles": ["stub"], "listeners": [l.to_dict() for l in listeners],
                                "persona": material}))
    starttls = {"ldap": "ldap", "smtp": "smtp", "imap": "imap", "pop3": "pop3"}
    ports = " ".join(f"{l.port}:{starttls.get(l.protocol, '') if l.security == 'starttls' else ''}" for l in listeners)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHON": sys.executable, "SPEC": str(spec), "DIR": str(tmp_path),
           "PORTS": ports, "CA": material["ca_file"], "OTHER_CA": other["ca_file"]}
    proc = subprocess.run(["unshare", "--net", "bash", "-c", SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    assert (tmp_path / "ready").read_text().startswith("READY"), (tmp_path / "stderr").read_text()[-2000:]
    failed = {p: r for p, r in lines.items() if not r.startswith("ok")}
    assert failed == {}, failed
    assert sorted(map(int, lines)) == sorted(l.port for l in listeners)
