"""The command line's small tools: --version, exec's errors, completion scripts, `up`'s host table,
the Vagrantfile."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from emulator import state
from emulator.catalog import load_catalog
from emulator.cli import MAX_HOSTS_LISTED, MAX_SERVICES_LISTED, _host_table
from emulator.topology import load_topology

ROOT = Path(__file__).resolve().parents[2]


def safeq_lab(*args, env=None, patch="") -> subprocess.CompletedProcess:
    code = f"import os, sys\n{patch}\nfrom emulator.cli import main\nsys.exit(main({list(args)!r}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


def one_line_error(proc, *needles):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 4 and len(lines) == 1 and lines[0].startswith("safeq-lab: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_version_comes_from_the_package_metadata():
    proc = safeq_lab("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"safeq-lab {version('safeq-lab')}"


def test_every_new_command_and_option_is_in_help():
    top = safeq_lab("--help").stdout
    assert "--version" in top and "exec" in top and "completion" in top
    assert "--run ID" in safeq_lab("exec", "--help").stdout
    assert "{bash,zsh}" in safeq_lab("completion", "--help").stdout


# -- exec ------------------------------------------------------------------------------------------
def live_lab(run_dir: Path, run_id: str, topology: str = "tiny") -> None:
    """A state file as a running lab writes it, owned by this (live) test process."""
    run_dir.mkdir(exist_ok=True)
    (run_dir / f"{run_id}-{topology}.state.json").write_text(json.dumps({
        "pid": os.getpid(), "start": state.start_time(os.getpid()), "topology": topology, "run": run_id,
        "run_dir": str(run_dir / f"{run_id}-{topology}"), "processes": [], "interfaces": [], "bridges": []}))


def test_exec_without_a_running_lab_names_safeq_lab_up(tmp_path):
    proc = safeq_lab("exec", "km1", "--", "true", env={"SAFEQ_LAB_RUN_DIR": str(tmp_path)})
    one_line_error(proc, "no lab is up", "`safeq-lab up`")


def test_exec_needs_a_command():
    one_line_error(safeq_lab("exec", "km1"), "after --", "safeq-lab exec km1 -- COMMAND")


def test_exec_with_several_labs_up_asks_for_run(tmp_path):
    live_lab(tmp_path, "ab1")
    live_lab(tmp_path, "cd2", "single-site")
    env = {"SAFEQ_LAB_RUN_DIR": str(tmp_path)}
    one_line_error(safeq_lab("exec", "km1", "--", "true", env=env), "2 labs are up", "ab1 (tiny)",
                   "cd2 (single-site)", "--run ID")
    one_line_error(safeq_lab("exec", "--run", "zz9", "km1", "--", "true", env=env), "--run zz9", "ab1", "cd2")


def test_exec_to_an_unknown_host_lists_the_nodes(tmp_path):
    live_lab(tmp_path, "ab1")
    proc = safeq_lab("exec", "--run", "ab1", "km1", "--", "true", env={"SAFEQ_LAB_RUN_DIR": str(tmp_path)},
                     patch="os.geteuid = lambda: 0")
    one_line_error(proc, "km1 is not a node of the lab ab1", "`safeq-lab up`")


def test_exec_needs_root(tmp_path):
    live_lab(tmp_path, "ab1")
    proc = safeq_lab("exec", "km1", "--", "true", env={"SAFEQ_LAB_RUN_DIR": str(tmp_path)},
                     patch="os.geteuid = lambda: 1000")
    one_line_error(proc, "root", "sudo")


# -- completion ------------------------------------------------------------------------------------
def complete(script: str, *words: str) -> list[str]:
    """What the bash completion function offers for the command line `words` (the last one is being typed)."""
    array = " ".join(f"'{w}'" for w in ("safeq-lab", *words))
    code = (f"{script}\nCOMP_WORDS=({array}); COMP_CWORD={len(words)}; _safeq_lab\n"
            "printf '%s\\n' \"${COMPREPLY[@]}\"")
    proc = subprocess.run(["bash", "--norc", "-c", code], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_bash_completion_offers_commands_actions_options_and_values():
    proc = safeq_lab("completion", "bash")
    assert proc.returncode == 0 and "complete -o filenames -F _safeq_lab safeq-lab" in proc.stdout
    script = proc.stdout
    assert {"audit", "rules", "exec", "completion", "--version"} <= set(complete(script, ""))
    assert complete(script, "rules", "") == ["-h", "--help", "generate", "check"]
    assert complete(script, "rules", "generate", "--format", "") == ["iptables", "nft", "aerleon"]
    assert complete(script, "audit", "--ti") == ["--timeout"]
    assert {"single-site", "fleet-1000"} <= set(complete(script, "audit", "--topology", ""))
    assert complete(script, "completion", "z") == ["zsh"]
    assert "bash" in complete(script, "exec", "km1", "--", "bas")  # after --: a command


def test_zsh_completion_reuses_the_bash_function_through_bashcompinit():
    proc = safeq_lab("completion", "zsh")
    assert proc.returncode == 0
    assert "bashcompinit" in proc.stdout and "_safeq_lab()" in proc.stdout
    one_line_error(safeq_lab("completion", "fish"), "invalid choice")


# -- up's host table ----------------------------------------------------------------------------------
def test_up_lists_each_host_with_address_roles_and_services():
    lines = _host_table(load_topology("single-site"), load_catalog())
    site1 = next(i for i, line in enumerate(lines) if line.startswith("site1 "))
    assert "198.18.1.10" in lines[site1] and "terminal-server" in lines[site1]
    services = lines[site1 + 1].split()
    assert "https://198.18.1.10:443" in services and "ldap://198.18.1.10:389" in services
    assert services[-2:] == [f"(+{services[-2][2:]}", "more)"] and len(services) == MAX_SERVICES_LISTED + 2
    mfd = lines[lines.index(next(l for l in lines if l.startswith("mfd-km "))) + 1]
    assert "socket://198.18.2.10:9100" in mfd and "snmp://198.18.2.10:161" in mfd


def test_up_bounds_the_table_for_a_fleet():
    topology = load_topology("fleet-1000")
    lines = _host_table(topology, load_catalog())
    listed = [l for l in lines if l and not l.startswith(" ")][1:-1]
    assert len(listed) == MAX_HOSTS_LISTED
    assert lines[-1].startswith(f"... and {len(topology.hosts) - MAX_HOSTS_LISTED} more hosts")
    assert "safeq-lab topology --topology fleet-1000" in lines[-1]


# -- Vagrantfile -------------------------------------------------------------------------------------
def vagrant_validate(directory: Path, dotfiles: Path) -> subprocess.CompletedProcess:
    # VAGRANT_DOTFILE_PATH: the .vagrant/ directory validate creates goes to a temporary place
    env = {**os.environ, "VAGRANT_DOTFILE_PATH": str(dotfiles), "VAGRANT_CHECKPOINT_DISABLE": "1"}
    return subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=directory, capture_output=True,
                          text=True, timeout=120, env=env)


def test_vagrantfile_validates(tmp_path):
    if not shutil.which("vagrant"):
        if os.environ.get("CI") == "true":
            pytest.fail("vagrant is missing: `apt-get install vagrant` (CI checks the Vagrantfile)")
        pytest.skip("vagrant is not installed (apt-get install vagrant); CI runs this")
    had_dotfiles = (ROOT / ".vagrant").exists()
    proc = vagrant_validate(ROOT, tmp_path / "dot")
    assert proc.returncode == 0 and "validated successfully" in proc.stdout, proc.stdout + proc.stderr
    assert (ROOT / ".vagrant").exists() == had_dotfiles  # nothing left in the checkout
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "Vagrantfile").write_text((ROOT / "Vagrantfile").read_text().replace('config.vm.box = ', 'config.vm.bax = '))
    assert vagrant_validate(broken, tmp_path / "dot2").returncode != 0  # the check can fail
