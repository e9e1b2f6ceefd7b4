"""The command line as a user meets it: exit codes, one-line errors, teardown on every path."""
from __future__ import annotations

import signal
import subprocess
import time

import pytest

from tests.lab.helpers import SAFEQ_LAB, footprint, run_cli, small_topology

pytestmark = pytest.mark.lab
CLEAN = {"bridges": [], "processes": [], "state": [], "mininet_shells": []}


def one_line_error(proc, *needles):
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("safeq-lab: error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for needle in needles:
        assert needle in lines[0]


def test_audit_with_a_dropped_port_exits_blocked_and_cleans_up(lab_host, tmp_path):
    topo = small_topology(tmp_path)
    generated = run_cli("rules", "generate", "--topology", topo)
    assert generated.returncode == 0
    dropped = tmp_path / "drop.rules"
    text = generated.stdout.replace("-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
                                    "-A FORWARD -p tcp -m tcp --dport 5021 -j DROP\n"
                                    "-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT")
    dropped.write_text(text)
    good = run_cli("audit", "--topology", topo)
    assert good.returncode == 0, good.stdout[-2000:] + good.stderr
    assert "PASS" in good.stdout.splitlines()[-1]
    bad = run_cli("audit", "--topology", topo, "--rules", str(dropped), "--json", str(tmp_path / "r.json"))
    assert bad.returncode == 1, bad.stdout[-2000:] + bad.stderr
    blocked = [l for l in bad.stdout.splitlines() if " BLOCKED" in l and not l.startswith("summary")]
    assert blocked and all("5021/tcp" in l for l in blocked)
    assert (tmp_path / "r.json").exists()
    assert footprint() == CLEAN


@pytest.mark.parametrize("args, needles", [
    (("audit", "--topology", "no-such-topology"), ("unknown topology", "single-site")),
    (("audit", "--rules", "/nonexistent/site.rules"), ("does not exist",)),
    (("rules", "check", "/etc/hostname"), ("neither an iptables-save",)),
])
def test_bad_input_gives_one_line_and_leaves_nothing(lab_host, args, needles):
    proc = run_cli(*args)
    assert proc.returncode == 4
    one_line_error(proc, *needles)
    assert footprint() == CLEAN


def test_malformed_rules_file_is_rejected_before_the_lab_is_built(lab_host, tmp_path):
    bad = tmp_path / "bad.rules"
    bad.write_text("*filter\n:FORWARD DROP [0:0]\n-A FORWARD -p tcp --dport 9100 -j NOSUCHTARGET\nCOMMIT\n")
    proc = run_cli("audit", "--rules", str(bad))
    assert proc.returncode == 4
    one_line_error(proc, str(bad), "not a valid iptables ruleset")
    assert footprint() == CLEAN


def wait_for_lab(proc, deadline=120):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            pytest.fail(f"lab exited early: {proc.stderr.read()}")
        if footprint()["processes"] and footprint()["bridges"]:
            time.sleep(0.5)
            return
        time.sleep(0.2)
    pytest.fail("lab did not come up")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_tears_everything_down(lab_host, tmp_path, signum):
    proc = subprocess.Popen([*SAFEQ_LAB, "audit", "--topology", small_topology(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_lab(proc)
    proc.send_signal(signum)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert footprint() == CLEAN


def test_clean_removes_what_a_killed_run_left(lab_host, tmp_path):
    proc = subprocess.Popen([*SAFEQ_LAB, "audit", "--topology", small_topology(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_lab(proc)
    proc.kill()
    proc.communicate(timeout=60)
    left = footprint()
    assert left["bridges"] and left["state"]
    blocked = run_cli("audit", "--topology", small_topology(tmp_path))
    assert blocked.returncode == 4
    one_line_error(blocked, "safeq-lab clean")
    cleaned = run_cli("clean")
    assert cleaned.returncode == 0, cleaned.stderr
    assert "bridge sqlab" in cleaned.stdout
    assert footprint() == CLEAN
    assert run_cli("clean").stdout.strip() == "safeq-lab: nothing to clean"


def test_up_gives_a_cli_behind_the_firewall_and_tears_down_on_exit(lab_host, tmp_path):
    topo = small_topology(tmp_path)
    ts_address = "198.18.100.10"
    # Mininet's CLI wants a terminal: `script` gives it one; the commands are typed with pauses.
    typed = (f"sleep 8; echo 'km1 ping -c1 -W2 {ts_address}'; sleep 4; echo 'ts1 ping -c1 -W2 198.18.101.10'; "
             "sleep 4; echo exit; sleep 8")
    command = " ".join([*SAFEQ_LAB, "up", "--topology", topo])
    proc = subprocess.run(["bash", "-c", f"({typed}) | script -qfec '{command}' /dev/null"],
                          capture_output=True, text=True, timeout=120)
    out = proc.stdout.replace("\r", "")
    assert "is up with rules" in out
    # the generated least-privilege rules: the MFD may not ping the Terminal Server, the reverse is a catalog flow
    assert "1 packets transmitted, 0 received" in out.split("km1 ping")[1].split("mininet>")[0]
    assert "1 packets transmitted, 1 received" in out.split("ts1 ping")[1].split("mininet>")[0]
    assert footprint() == CLEAN


def test_zone_link_loss_drops_that_zones_traffic(lab_host, tmp_path):
    topo = tmp_path / "lossy.yaml"
    topo.write_text(open(small_topology(tmp_path)).read().replace(
        "  - name: devices\n", "  - name: devices\n    link: {loss: 100, bw: 100}\n"))
    proc = run_cli("audit", "--topology", str(topo), "--timeout", "1")
    # The loss sits on a shaper between the zone and the firewall, outside the ruleset under test: the
    # firewall never sees the lost packets, so the lab cannot grade those flows, and says why.
    assert proc.returncode & 8, proc.stdout[-1500:] + proc.stderr
    lines = [l for l in proc.stdout.splitlines() if " allow " in l]
    assert lines and all("LAB-ERROR" in l for l in lines), lines
    assert "the devices link loses 100 % of packets" in proc.stdout
    assert footprint() == CLEAN


def test_an_nft_ruleset_is_applied_like_an_iptables_one(lab_host, tmp_path):
    topo = small_topology(tmp_path)
    nft = tmp_path / "site.nft"
    generated = run_cli("rules", "generate", "--topology", topo, "--format", "nft", "-o", str(nft))
    assert generated.returncode == 0, generated.stderr
    good = run_cli("audit", "--topology", topo, "--rules", str(nft))
    assert good.returncode == 0, good.stdout[-2000:] + good.stderr
    assert f"rules: fw: {nft}" in good.stdout
    # the same ruleset without its FTP helper: the firewall drops the scan upload's data channel, nothing else
    nft.write_text("\n".join(l for l in nft.read_text().splitlines() if "ct helper set" not in l) + "\n")
    broken = run_cli("audit", "--topology", topo, "--rules", str(nft))
    assert broken.returncode == 1
    bad = [l for l in broken.stdout.splitlines() if " BLOCKED" in l and not l.startswith("summary")]
    assert bad and all(" ftp " in l and "data channel" in l for l in bad), bad
    assert " BROKEN" not in broken.stdout
    assert footprint() == CLEAN


def test_exec_runs_a_command_in_a_host_of_a_lab_up_keeps_running(lab_host, tmp_path):
    import queue
    import re
    import threading

    command = " ".join([*SAFEQ_LAB, "up", "--topology", small_topology(tmp_path)])
    # Mininet's CLI wants a terminal: `script` gives it one, and types what we write to its stdin
    proc = subprocess.Popen(["script", "-qfec", command, "/dev/null"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(l) for l in proc.stdout], daemon=True).start()
    seen, run_id, deadline = [], None, time.monotonic() + 120
    try:
        while run_id is None and time.monotonic() < deadline:
            try:
                seen.append(lines.get(timeout=1).replace("\r", ""))
            except queue.Empty:
                assert proc.poll() is None, "".join(seen)
                continue
            found = re.search(r"is up with rules .*; run ([a-z0-9]{3}), ", seen[-1])
            run_id = found and found[1]
        assert run_id, "".join(seen)
        out = "".join(seen)
        # the host table: every host with its address, roles and how to reach its services
        assert re.search(r"^ts1 +198\.18\.100\.10 +terminal-server, spooler-controller$", out, re.M), out
        assert "https://198.18.100.10:" in out and "ldap://198.18.100.10:389" in out, out
        inside = run_cli("exec", "--run", run_id, "km1", "--", "ip", "-4", "-o", "addr", "show", timeout=60)
        assert inside.returncode == 0, inside.stderr
        assert "198.18.101.10/24" in inside.stdout and "198.18.100.10" not in inside.stdout
        through = run_cli("exec", "--run", run_id, "ts1", "--", "ping", "-c1", "-W2", "198.18.101.10", timeout=60)
        assert through.returncode == 0 and "1 received" in through.stdout, through.stdout + through.stderr
        status = run_cli("exec", "--run", run_id, "km1", "--", "sh", "-c", "exit 3", timeout=60)
        assert status.returncode == 3  # the command's own exit status
        unknown = run_cli("exec", "--run", run_id, "no-such-host", "--", "true", timeout=60)
        assert unknown.returncode == 4
        one_line_error(unknown, "no-such-host", "`safeq-lab up`", "km1", "ts1")
        wrong_run = run_cli("exec", "--run", "zz9", "km1", "--", "true", timeout=60)
        assert wrong_run.returncode == 4
        one_line_error(wrong_run, "--run zz9", run_id)
    finally:
        if proc.poll() is None:
            proc.stdin.write("exit\n")
            proc.stdin.flush()
        proc.wait(timeout=120)
    assert footprint() == CLEAN
    gone = run_cli("exec", "--run", run_id, "km1", "--", "true", timeout=60)
    assert gone.returncode == 4 and "`safeq-lab up`" in gone.stderr
