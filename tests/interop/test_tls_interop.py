"""openssl s_client and gnutls-cli against every secured port of the catalog, on the real port numbers:
implicit TLS, STARTTLS, and the 'optional' ports whose protocol has an in-band upgrade (SMTP, LDAP,
PostgreSQL), which the stubs offer when the host has a certificate.

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
  extra=""; gextra=""
  [ -n "$starttls" ] && extra="-starttls $starttls" && gextra="--starttls-proto=$starttls"
  if echo Q | timeout 10 openssl s_client -connect 127.0.0.1:$port $extra -CAfile "$CA" -verify_return_error \
       -verify_hostname stub.lab -servername stub.lab > "$DIR/out-$port" 2>&1; then
    echo "$port openssl ok"
  else
    echo "$port openssl fail $(grep -m1 -iE 'verify error|error|errno' "$DIR/out-$port" | tr -d '\n')"
  fi
  if echo Q | timeout 10 openssl s_client -connect 127.0.0.1:$port $extra -CAfile "$OTHER_CA" \
       -verify_return_error -servername stub.lab > /dev/null 2>&1; then
    echo "$port openssl untrusted-accepted"
  fi
  if timeout 10 gnutls-cli --x509cafile "$CA" --verify-hostname=stub.lab --sni-hostname=stub.lab $gextra \
       -p $port 127.0.0.1 < /dev/null > "$DIR/gout-$port" 2>&1 && grep -q "Handshake was completed" "$DIR/gout-$port"; then
    echo "$port gnutls ok"
  else
    echo "$port gnutls fail $(grep -m1 -iE 'error|fatal|not trusted' "$DIR/gout-$port" | tr -d '\n')"
  fi
  if timeout 10 gnutls-cli --x509cafile "$OTHER_CA" --verify-hostname=stub.lab $gextra -p $port 127.0.0.1 \
       < /dev/null > /dev/null 2>&1; then
    echo "$port gnutls untrusted-accepted"
  fi
done
kill $daemon; wait $daemon
"""


# protocol -> its in-band upgrade, as openssl s_client -starttls and gnutls-cli --starttls-proto name it
STARTTLS = {"ldap": "ldap", "smtp": "smtp", "imap": "imap", "pop3": "pop3", "pgsql": "postgres", "ftp": "ftp"}


def secured_listeners():
    catalog = load_catalog()
    return [l for l in roles.listeners(list(catalog.roles), catalog)
            if l.transport == "tcp" and l.protocol not in NOT_TLS
            and (l.security in ("tls", "starttls") or (l.security == "optional" and l.protocol in STARTTLS))]


def test_openssl_and_gnutls_verify_every_secured_port(tmp_path):
    assert shutil.which("openssl"), "apt-get install openssl"
    assert shutil.which("gnutls-cli"), "apt-get install gnutls-bin"
    assert shutil.which("unshare"), "apt-get install util-linux"
    listeners = secured_listeners()
    assert len(listeners) > 20
    material = pki.make_test_pki(tmp_path / "pki", host="stub.lab", address="127.0.0.1")
    other = pki.make_test_pki(tmp_path / "other", host="stub.lab")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"host": "stub", "roles": ["stub"], "listeners": [l.to_dict() for l in listeners],
                                "persona": material}))
    ports = " ".join(f"{l.port}:{STARTTLS.get(l.protocol, '') if l.security != 'tls' else ''}" for l in listeners)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHON": sys.executable, "SPEC": str(spec), "DIR": str(tmp_path),
           "PORTS": ports, "CA": material["ca_file"], "OTHER_CA": other["ca_file"]}
    proc = subprocess.run(["unshare", "--net", "bash", "-c", SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    results = {}
    for line in proc.stdout.splitlines():
        port, tool, verdict = (line.split(" ", 2) + ["", ""])[:3]
        results.setdefault((int(port), tool), []).append(verdict)
    assert (tmp_path / "ready").read_text().startswith("READY"), (tmp_path / "stderr").read_text()[-2000:]
    failed = {key: verdicts for key, verdicts in results.items() if verdicts != ["ok"]}
    assert failed == {}, failed
    assert sorted(results) == sorted((l.port, tool) for l in listeners for tool in ("openssl", "gnutls"))
