"""`--rules [NODE=]FILE` entries and `rules generate` per node and for Aerleon, without a lab."""
import subprocess
import sys

import pytest

from emulator.cli import _rules_entries
from emulator.errors import LabError


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "emulator.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def test_rules_entries_name_nodes_or_the_first_firewall():
    assert _rules_entries(["site.rules"]) == {None: "site.rules"}
    assert _rules_entries(["fw=a.rules", "db1=/etc/b=c.rules"]) == {"fw": "a.rules", "db1": "/etc/b=c.rules"}
    assert _rules_entries(["./dir=x/site.rules"]) == {None: "./dir=x/site.rules"}  # a path, not a node
    with pytest.raises(LabError, match="twice"):
        _rules_entries(["a.rules", "b.rules"])


def test_rules_generate_per_node_of_a_two_firewall_topology():
    site = cli("rules", "generate", "--topology", "branch-office", "--node", "fw")
    branch = cli("rules", "generate", "--topology", "branch-office", "--node", "bfw", "--format", "nft")
    assert site.returncode == 0 and branch.returncode == 0, site.stderr + branch.stderr
    assert site.stdout.startswith("# safeq-lab") and "*filter" in site.stdout
    assert "table inet" in branch.stdout and branch.stdout != site.stdout
    unknown = cli("rules", "generate", "--topology", "branch-office", "--node", "nosuch")
    assert unknown.returncode == 4 and len(unknown.stderr.strip().splitlines()) == 1


def test_rules_generate_aerleon_writes_a_policy_directory(tmp_path):
    proc = cli("rules", "generate", "--format", "aerleon", "-o", str(tmp_path / "aerleon"))
    assert proc.returncode == 0, proc.stderr
    written = {p.relative_to(tmp_path / "aerleon").as_posix() for p in (tmp_path / "aerleon").rglob("*") if p.is_file()}
    assert {"def/networks.yaml", "def/services.yaml", "pol/safeq-lab.yaml", "conntrack-helpers.yaml"} <= written
    no_dir = cli("rules", "generate", "--format", "aerleon")
    assert no_dir.returncode == 4 and "-o DIR" in no_dir.stderr
