"""The command line's answers to a missing prerequisite: one line naming the fix, exit 4."""
import subprocess
import sys

import pytest


def run_patched(patch: str, *args):
    code = (f"import os, sys\n{patch}\n"
            f"from emulator.cli import main\nsys.exit(main({list(args)!r}))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def assert_one_line(proc, *needles):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 4, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("safeq-lab: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize("command", [["audit"], ["up"], ["clean"]])
def test_not_root(command):
    assert_one_line(run_patched("os.geteuid = lambda: 1000", *command), "root", "sudo")


def test_mininet_missing():
    patch = "os.geteuid = lambda: 0\nsys.modules['mininet'] = None\nsys.modules['mininet.net'] = None"
    assert_one_line(run_patched(patch, "audit"), "Mininet", "setup.sh")


def test_unknown_role_in_catalog_filter_is_one_line():
    proc = run_patched("", "catalog", "--role", "no-such-role")
    assert_one_line(proc, "no-such-role")


def test_catalog_lists_and_filters():
    proc = run_patched("", "catalog", "--port", "5022")
    assert proc.returncode == 0
    assert proc.stdout.strip().splitlines()[-1].split()[0] != "0"
    # a port matches the rows naming it and the FTP data ranges holding it
    assert all("5022/" in line or "1024-65535/" in line for line in proc.stdout.strip().splitlines()[:-1])


def test_rules_check_without_root_says_so(tmp_path):
    ruleset = tmp_path / "r.rules"
    ruleset.write_text("*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n")
    assert_one_line(run_patched("os.geteuid = lambda: 1000", "rules", "check", str(ruleset)), "needs root", "sudo")


def test_an_error_raised_while_interrupted_counts_as_an_interruption():
    from emulator.cli import _raised_while_interrupted

    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("teardown failed")
    except RuntimeError as exc:
        assert _raised_while_interrupted(exc)
    assert not _raised_while_interrupted(RuntimeError("a plain bug"))
