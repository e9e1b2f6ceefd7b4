"""Every vendor story (scenarios/vendor-*.yaml) runs green in a real lab: each workflow of each MFD
family and terminal works. The stories change nothing in the lab (no faults, no repair; the unit
tests check that), so they all share one single-site lab with the generated rules, built once."""
from __future__ import annotations

import io
import time

import pytest

from emulator.catalog import load_catalog
from emulator.lab import Lab, preflight
from emulator.scenario import Runner, available_scenarios, load_scenario
from emulator.scenario.command import scenario_rulesets
from emulator.scenario.schema import Expect, Fault, Holds, Parallel
from tests.lab.helpers import footprint

pytestmark = pytest.mark.lab
VENDOR_PREFIX = "vendor-"
STORY_SECONDS = 10.0  # a vendor story is a handful of workflows that work; more is a slow story
VENDOR_SCENARIOS = [name for name in available_scenarios() if name.startswith(VENDOR_PREFIX)]


def shared_setup(scenario) -> tuple:
    """What a story needs of its lab; stories that agree on it can run in one."""
    members = [m for step in scenario.steps + scenario.repair
               for m in (step.steps if isinstance(step, Parallel) else (step,))]
    changes_the_lab = any(isinstance(m, Fault) for m in members) or bool(scenario.impairable)
    return scenario.topology.name, tuple(sorted(scenario.rules.items())), changes_the_lab


@pytest.fixture(scope="module")
def shared_lab(lab_host):
    """One single-site lab with the generated rules for every vendor story; torn down without a trace."""
    catalog = load_catalog()
    first = load_scenario(VENDOR_SCENARIOS[0], catalog)
    rulesets = scenario_rulesets(first)
    preflight()
    with Lab(first.topology, catalog) as lab:
        lab.apply_rules(rulesets)
        yield shared_setup(first), lab, rulesets, catalog
    assert not any(footprint().values()), footprint()


def test_there_are_vendor_stories():
    assert len(VENDOR_SCENARIOS) >= 15, VENDOR_SCENARIOS


@pytest.mark.parametrize("name", VENDOR_SCENARIOS)
def test_vendor_story_is_green(shared_lab, name):
    setup, lab, rulesets, catalog = shared_lab
    scenario = load_scenario(name, catalog)
    assert shared_setup(scenario) == setup, f"{name} needs a lab of its own: {shared_setup(scenario)}"
    out = io.StringIO()
    started = time.monotonic()
    result = Runner(scenario, lab, rulesets, out).run()
    took = time.monotonic() - started
    text = out.getvalue()
    expectations = sum(1 for step in scenario.steps if isinstance(step, (Expect, Holds)))
    assert result.passed, text
    assert f"Scenario {name}: {expectations} of {expectations} expectations hold\n" in text, text
    assert took < STORY_SECONDS, f"{name} took {took:.1f}s:\n{text}"
