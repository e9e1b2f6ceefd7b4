"""How a site's own test suite uses safeq-lab: nothing from the project but the pytest plugin.

The plugin comes with the package (entry point `pytest11: safeq_lab`): the `safeq_lab` fixture is
a running lab (default: single-site behind the generated least-privilege rules; see
`--safeq-lab-topology`, `--safeq-lab-rules`, `--safeq-lab-scope`), torn down after this module.
"""
import pytest

from emulator.pytest_plugin import assert_flow_allowed, assert_no_exposures

pytestmark = pytest.mark.lab  # builds a real Mininet network: root


def test_konica_minolta_terminal_reaches_its_terminal_server(safeq_lab):
    assert_flow_allowed(safeq_lab, flow="terminal-server-11", client="mfd-km", server="site1")


def test_nothing_is_exposed_to_the_printer(safeq_lab):
    report = safeq_lab.audit(client="mfd-km")
    assert_flow_allowed(report, client="mfd-km")
    assert_no_exposures(report)
