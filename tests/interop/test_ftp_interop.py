"""Real FTP clients (lftp, curl) against our stub run as `python -m emulator.roled`, in
passive and active mode, and our probe (through `python -m emulator.prober`) against it.

The stub's request log is the second witness: every upload must show up there with the
bytes and SHA-256 the client sent, and the data-channel mode it used.

The last test runs stub and probe on the real ports (21, data port 20) inside a throwaway
network namespace (`unshare --net`, root) behind an iptables firewall that admits the
control port only: both modes must then report protocol_error "data channel: ...", and
must work again once the FTP conntrack helper is attached.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emulator.protocols import payloads
from emulator.protocols import ftp
from tests.support import client_tool, request_log, run_stub
from tests.support import free_port_pair as control_port

pytestmark = pytest.mark.interop

PASSIVE = [30000, 30999]
PERSONA = {"identity": {"vendor": "Y Soft", "passive_ports": PASSIVE}}



@pytest.fixture
def stub(tmp_path):
    port = control_port()
    listeners = [{"transport": "tcp", "port": port, "protocol": "ftp", "security": "plain"}]
    with run_stub(tmp_path, listeners, persona=PERSONA, host="terminal-server-1",
                  roles=("terminal_server",)) as log:
        yield port, log


@pytest.fixture
def document(tmp_path):
    path = tmp_path / "scan.pdf"
    data = payloads.scan_document(1_500_000, "interop")
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest(), len(data)


def records_for(log, name: str, wait: float = 3.0) -> list[dict]:
    deadline = time.monotonic() + wait
    while True:
        found = [r for r in request_log(log) if r.get("file") == f"/{name}"]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def run(argv: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def lftp(port: int, passive: bool, commands: str) -> subprocess.CompletedProcess:
    script = (f"set net:max-retries 1; set net:timeout 5; set ftp:ssl-allow no; "
              f"set ftp:passive-mode {'on' if passive else 'off'}; "
              f"open -u scan,scan -p {port} 127.0.0.1; {commands}")
    return run([client_tool("lftp", "lftp"), "-c", script])


@pytest.mark.parametrize("passive", [True, False], ids=["passive", "active"])
def test_lftp_put_and_get(stub, document, tmp_path, passive):
    port, log = stub
    path, sha, size = document
    name = f"lftp-{'passive' if passive else 'active'}.pdf"
    back = tmp_path / "back.pdf"
    done = lftp(port, passive, f"put {path} -o {name}; get {name} -o {back}")
    assert done.returncode == 0, done.stderr
    assert hashlib.sha256(back.read_bytes()).hexdigest() == sha
    [record] = records_for(log, name)
    assert (record["op"], record["bytes"], record["sha256"]) == ("STOR", size, sha)
    assert record["peer"] == "127.0.0.1" and record["port"] == port
    assert record["host"] == "terminal-server-1"
    if passive:
        assert record["mode"] == "passive"
        assert PASSIVE[0] <= record["data_port"] <= PASSIVE[1]
    else:
        assert record["mode"] == "active"
        assert record["data_port"] == port - 1  # connect-back from the data port (L-1)


@pytest.mark.parametrize("passive", [True, False], ids=["passive", "active"])
def test_curl_upload_and_download(stub, document, tmp_path, passive):
    port, log = stub
    path, sha, size = document
    curl = client_tool("curl", "curl")
    name = f"curl-{'passive' if passive else 'active'}.pdf"
    url = f"ftp://scan:scan@127.0.0.1:{port}/{name}"
    mode = [] if passive else ["--ftp-port", "-"]
    done = run([curl, "-sS", "--max-time", "20", *mode, "-T", str(path), url])
    assert done.returncode == 0, done.stderr
    back = tmp_path / "back.pdf"
    done = run([curl, "-sS", "--max-time", "20", *mode, "-o", str(back), url])
    assert done.returncode == 0, done.stderr
    assert hashlib.sha256(back.read_bytes()).hexdigest() == sha
    [record] = records_for(log, name)
    assert (record["bytes"], record["sha256"]) == (size, sha)
    assert record["mode"] == ("passive" if passive else "active")


def test_curl_sees_errors_for_bad_commands_and_the_stub_keeps_serving(stub, document):
    port, log = stub
    path, sha, _ = document
    curl = client_tool("curl", "curl")
    done = run([curl, "-sS", "--max-time", "10", "-Q", "FOO bar", f"ftp://scan:scan@127.0.0.1:{port}/"])
    assert done.returncode != 0 and "500" in done.stderr + done.stdout, done
    done = run([curl, "-sS", "--max-time", "10", "--user", "scan:wrong", f"ftp://127.0.0.1:{port}/"])
    assert done.returncode != 0
    url = f"ftp://scan:scan@127.0.0.1:{port}/after.pdf"
    done = run([curl, "-sS", "--max-time", "20", "-T", str(path), url])
    assert done.returncode == 0, done.stderr
    assert records_for(log, "after.pdf")[0]["sha256"] == sha


def test_our_probe_through_the_prober_cli(stub):
    port, log = stub
    targets = [{"id": mode, "host": "127.0.0.1", "transport": "tcp", "protocol": "ftp", "port": port,
                "timeout": 2.0, "options": {"mode": mode}}
               for mode in ("passive", "active")]
    done = subprocess.run([sys.executable, "-m", "emulator.prober"], input=json.dumps(targets),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    results = {r["id"]: r for r in json.loads(done.stdout)}
    for mode in ("passive", "active"):
        result = results[mode]
        assert result["outcome"] == "ok", result
        assert result["exchange"].startswith(f"FTP {mode} upload"), result
        assert result["peer_seen"] == "127.0.0.1"
    records = request_log(log)
    assert sorted(r["mode"] for r in records) == ["active", "passive"]
    assert all(r["bytes"] == ftp.MIN_UPLOAD for r in records)
    assert any(r["data_port"] == port - 1 for r in records if r["mode"] == "active")


NAMESPACE_SCRIPT = r"""
set -eu
ip link set lo up
"$PYTHON" -m emulator.roled "$DIR/spec.json" > "$DIR/ready" 2> "$DIR/stderr" &
daemon=$!
trap 'kill $daemon 2>/dev/null; wait $daemon 2>/dev/null' EXIT
for i in $(seq 1 200); do grep -q READY "$DIR/ready" 2>/dev/null && break; sleep 0.05; done
probe() { "$PYTHON" -m emulator.prober < "$DIR/targets.json" > "$DIR/$1.json"; }
probe open
# A stateful firewall that admits the control port only.
iptables -A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
iptables -A INPUT -p tcp --dport 21 -j ACCEPT
iptables -A INPUT -j DROP
probe control-only
# The same plus the FTP conntrack helper: data channels become RELATED.
iptables -t raw -A OUTPUT -p tcp --dport 21 -j CT --helper ftp
probe helper
iptables -I INPUT 1 -p tcp --dport 21 --syn -j DROP
probe closed
"""


def test_firewall_that_admits_only_the_control_port(tmp_path):
    """On the real ports (21, data port 20) inside a throwaway network namespace, with
    iptables rules that only that namespace sees: open, control port only (data channels
    blocked), control port plus the FTP conntrack helper, and everything closed."""
    client_tool("unshare", "util-linux")
    client_tool("iptables", "iptables")
    log = tmp_path / "requests.jsonl"
    (tmp_path / "spec.json").write_text(json.dumps({
        "host": "terminal-server-1", "roles": ["terminal_server"], "interface": "127.0.0.1",
        "log": str(log), "persona": PERSONA,
        "listeners": [{"transport": "tcp", "port": 21, "protocol": "ftp", "security": "plain"}]}))
    (tmp_path / "targets.json").write_text(json.dumps([
        {"id": mode, "host": "127.0.0.1", "transport": "tcp", "protocol": "ftp", "port": 21,
         "timeout": 2.0, "options": {"mode": mode}}
        for mode in ("passive", "active")]))
    done = subprocess.run(["unshare", "--net", "sh", "-c", NAMESPACE_SCRIPT], capture_output=True,
                          text=True, timeout=90,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHON": sys.executable,
                               "DIR": str(tmp_path), "PYTHONPATH": str(Path(__file__).parents[2])})
    assert done.returncode == 0, done.stderr + (tmp_path / "stderr").read_text()

    def results(name):
        return {r["id"]: r for r in json.loads((tmp_path / name).read_text())}

    for name in ("open", "helper"):
        result = results(f"{name}.json")
        assert [result[m]["outcome"] for m in ("passive", "active")] == ["ok", "ok"], (name, result)
    records = request_log(log)
    assert sorted(r["mode"] for r in records) == ["active", "active", "passive", "passive"]
    assert {r["data_port"] for r in records if r["mode"] == "active"} == {20}
    budget = ftp.transfer_budget(2.0)
    blocked = results("control-only.json")
    for mode in ("passive", "active"):
        result = blocked[mode]
        assert result["outcome"] == "protocol_error", result
        assert result["detail"].startswith("data channel:"), result
        assert "login 230" in result["exchange"]
        assert 2.0 <= result["elapsed"] < budget
    assert "PASV port 30" in blocked["passive"]["detail"]
    assert "no connect-back" in blocked["active"]["detail"]
    closed = results("closed.json")
    for mode in ("passive", "active"):
        assert closed[mode]["outcome"] == "timeout", closed[mode]
