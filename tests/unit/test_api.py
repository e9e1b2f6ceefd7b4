"""The Python API without a lab: cheap import, check selection, rules specs, errors before building."""
from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

import emulator
from emulator.api import SafeqLab, resolve_rules, select_checks
from emulator.errors import LabError

README = Path(__file__).resolve().parents[2] / "README.md"


def imported_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"import sys\n{code}\nprint('\\n'.join(sys.modules))"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return set(out.split())


@pytest.mark.parametrize("code", ["import emulator", "from emulator import SafeqLab",
                                  "import emulator.api, emulator.pytest_plugin"])
def test_importing_the_api_loads_neither_mininet_nor_twisted(code):
    modules = imported_after(code)
    heavy = sorted(m for m in modules if m.split(".")[0] in ("mininet", "twisted", "emulator.lab"))
    assert heavy == [] and "emulator.lab" not in modules, heavy


def test_the_package_names_its_api_and_version():
    assert emulator.SafeqLab is SafeqLab
    assert emulator.__version__ == version("safeq-lab")
    assert {"SafeqLab", "run_scenario", "AuditReport", "FlowVerdict", "Verdict", "LabError"} <= set(dir(emulator))
    with pytest.raises(AttributeError):
        emulator.no_such_name  # noqa: B018


@pytest.fixture(scope="module")
def planned():
    """A SafeqLab that was never entered: its plan, nothing built."""
    return SafeqLab("single-site", rules="generated")


def test_check_selection_by_flow_client_server_and_port(planned):
    checks = planned.select(flow="terminal-server-11", client="mfd-km", server="site1")
    assert len(checks) == 8 and {c.endpoint.port for c in checks} == {5014, 5015, 5016, 5017, 5018, 5019, 5021, 5022}
    assert [c.endpoint.port for c in planned.select(flow="terminal-server-11", client="mfd-km", server="site1",
                                                     port=5021)] == [5021]
    exposures = planned.select(client="mfd-km", kind="exposure")
    assert exposures and all(str(c.kind) == "exposure" and c.client_host == "mfd-km" for c in exposures)
    assert select_checks(planned.checks, flow="no-such-flow") == []


def test_a_check_outside_the_with_block_or_matching_nothing_is_a_one_line_error(planned):
    with pytest.raises(LabError, match="needs a filter"):
        planned.check()
    with pytest.raises(LabError, match="no planned check .* flow='no-such-flow'"):
        planned.check(flow="no-such-flow")
    with pytest.raises(LabError, match=r"not running: use it inside `with SafeqLab"):
        planned.check(flow="terminal-server-11", client="mfd-km", server="site1")
    assert not planned.running


def test_rules_specs(planned):
    topology, checks = planned.topology, planned.checks
    generated = resolve_rules(topology, checks, "generated")
    assert list(generated) == ["fw"] and generated["fw"].source.startswith("generated")
    assert resolve_rules(topology, checks, None)["fw"].text == generated["fw"].text  # single-site has no rules files
    assert resolve_rules(topology, checks, {"fw": generated["fw"]}) == generated
    with pytest.raises(LabError, match="nodes: fw"):
        resolve_rules(topology, checks, {"no-such-node": "generated"})
    with pytest.raises(LabError, match="does not exist"):
        resolve_rules(topology, checks, "/nonexistent/site.rules")
    with pytest.raises(LabError, match="neither an iptables-save"):
        resolve_rules(topology, checks, "hello\nworld\n")
    with pytest.raises(LabError, match="not int"):
        resolve_rules(topology, checks, 42)


def test_a_host_given_a_rules_file_gets_a_host_firewall_in_the_plan(tmp_path):
    rules = tmp_path / "db1.rules"
    rules.write_text("*filter\n:INPUT DROP [0:0]\nCOMMIT\n")
    lab = SafeqLab("single-site", rules={"fw": "generated", "db1": str(rules)})
    assert "db1" in lab.topology.filtering_nodes
    assert any(e.node == "db1" for c in lab.select(server="db1") for e in c.enforcers)


def test_the_readme_shows_the_api_example_that_the_lab_test_runs():
    from tests.lab.test_api_lab import documented_example

    example = documented_example()
    assert "```python\n" + example + "```" in README.read_text(), (
        "README.md must show emulator/api.py's example verbatim in a ```python block (tests/lab/test_api_lab.py runs it)")
