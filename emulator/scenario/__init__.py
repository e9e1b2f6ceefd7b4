"""Scenarios: ordered steps (workflows, faults, expectations) run in a lab, told in words a trainer reads aloud.

`schema` reads and validates scenario files (scenarios/*.yaml) before anything is built;
`runner` runs one in a lab; `command` is `safeq-lab scenario run|list`.
"""
from emulator.scenario.runner import Runner, ScenarioResult, judge
from emulator.scenario.schema import Scenario, available_scenarios, load_scenario

__all__ = ["Runner", "Scenario", "ScenarioResult", "available_scenarios", "judge", "load_scenario"]
