"""Every shipped scenario runs green in a real lab: each shows the failure it promises and its
repair section passes. One lab per scenario (its faults change rules, links, daemons and
certificates); each takes a few seconds of lab time (the low-bandwidth one about 15 s).

What a scenario measures is checked against what its faults configured: a round trip measured
on a delayed link is the healthy round trip plus the added delay, within 10 % of that delay
(scg-latency-over-wan: 90 and 150 ms on the WAN); a table's delivery times are size x 8 / rate
within 20 % and grow with the size (low-bandwidth-print-delivery: 1, 4 and 16 MB at 20 Mbit/s)."""
from __future__ import annotations

import io
import time

import pytest

from emulator.scenario import available_scenarios, load_scenario
from emulator.scenario.command import run_scenario
from emulator.scenario.schema import Fault, Parallel, Table, Workflow
from tests.lab.helpers import footprint

pytestmark = pytest.mark.lab
LAB_SECONDS = 30.0  # a scenario is meant to stay under 20 s of lab time; more is a slow scenario
LATENCY_TOLERANCE = 0.10   # of the added delay
RATE_TOLERANCE = 0.20      # of the predicted delivery time


# failure-mode scenarios (with a repair); vendor-* stories run in tests/lab/test_vendor_scenarios_lab.py,
# *-workflow stories in tests/lab/test_workflow_scenarios_lab.py
@pytest.mark.parametrize("name", [n for n in available_scenarios()
                                  if not n.startswith("vendor-") and not n.endswith("-workflow")])
def test_shipped_scenario_is_green(lab_host, name):
    scenario = load_scenario(name)
    out = io.StringIO()
    started = time.monotonic()
    result = run_scenario(name, out)
    took = time.monotonic() - started
    text = out.getvalue()
    assert result.passed, text
    assert f"Scenario {name}: {len(result.expectations)} of {len(result.expectations)} expectations hold\n" in text
    assert len(result.expectations) >= sum(1 for step in scenario.steps + scenario.repair
                                           if type(step).__name__ == "Expect")
    assert scenario.repair and "Repair:" in text
    assert took < LAB_SECONDS, f"{name} took {took:.1f}s:\n{text}"
    assert not any(footprint().values()), footprint()
    for workflow_id, delay_ms, base_ms in delayed_round_trips(scenario, result):
        measured = result.workflows[workflow_id].round_trip_ms
        assert abs(measured - (base_ms + delay_ms)) <= LATENCY_TOLERANCE * delay_ms, \
            f"{workflow_id}: {measured:.1f} ms measured, {base_ms:.1f} + {delay_ms:g} ms configured\n{text}"
    for table in (step for step in scenario.steps + scenario.repair if isinstance(step, Table)):
        rows = [(scenario.workflows()[i].size, result.workflows[i].elapsed) for i in table.targets]
        for size, elapsed in rows:
            predicted = size * 8 / (table.mbit * 1e6)
            assert abs(elapsed - predicted) <= RATE_TOLERANCE * predicted, \
                f"{size} B took {elapsed:.2f} s, predicted {predicted:.2f} s at {table.mbit:g} Mbit/s\n{text}"
        ordered = [elapsed for _size, elapsed in sorted(rows)]
        assert ordered == sorted(ordered), text


def delayed_round_trips(scenario, result) -> list[tuple[str, float, float]]:
    """(workflow id, delay its link had, round trip of the same flow on the healthy link) for every
    workflow that measured a round trip while a delay fault was in force."""
    delay, base, found = 0.0, {}, []
    for step in scenario.steps + scenario.repair:
        for item in (step.steps if isinstance(step, Parallel) else (step,)):
            if isinstance(item, Fault) and item.kind in ("delay", "clear"):
                delay = item.ms if item.kind == "delay" else 0.0
            elif isinstance(item, Workflow) and result.workflows.get(item.id) is not None:
                measured = result.workflows[item.id].round_trip_ms
                if measured is None:
                    continue
                key = (item.flow.id, item.client, item.server)
                if not delay:
                    base.setdefault(key, measured)
                elif key in base:
                    found.append((item.id, delay, base[key]))
    return found


def test_the_latency_scenario_checks_configured_delays():
    """The 10 % check above has something to check: the latency scenario delays the WAN twice."""
    scenario = load_scenario("scg-latency-over-wan")
    delays = [s.ms for s in scenario.steps if isinstance(s, Fault) and s.kind == "delay"]
    assert delays == [90, 150]
    assert all(w.options.get("rounds") for w in scenario.workflows().values())
