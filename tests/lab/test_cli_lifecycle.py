"""The command line as a user meets it: exit codes, one-line errors, teardown on every path."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from emulator.state import RUN_DIR
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
