"""Every shipped scenario runs green in a real lab: each shows the failure it promises and its
repair section passes. One lab per scenario (a stopped daemon cannot be restarted in place);
each takes a few seconds of lab time."""
from __future__ import annotations

import io
import time

import pytest

from emulator.scenario import available_scenarios, load_scenario
from emulator.scenario.command import run_file
from tests.lab.helpers import footprint

pytestmark = pytest.mark.lab
LAB_SECONDS = 30.0  # a scenario is meant to stay under 20 s of lab time; more is a slow scenario


# failure-mode scenarios (with a repair); vendor-* stories run in tests/lab/test_vendor_scenarios_lab.py
@pytest.mark.parametrize("name", [n for n in available_scenarios() if not n.startswith("vendor-")])
def test_shipped_scenario_is_green(lab_host, name):
    scenario = load_scenario(name)
    out = io.StringIO()
    started = time.monotonic()
    status = run_file(name, out)
    took = time.monotonic() - started
    text = out.getvalue()
    expectations = sum(1 for step in scenario.steps + scenario.repair if type(step).__name__ == "Expect")
    assert status == 0, text
    assert f"Scenario {name}: {expectations} of {expectations} expectations hold\n" in text, text
    assert scenario.repair and "Repair:" in text
    assert took < LAB_SECONDS, f"{name} took {took:.1f}s:\n{text}"
    assert not any(footprint().values()), footprint()
