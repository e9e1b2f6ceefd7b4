"""`safeq-lab scenario run FILE [--step]` and `safeq-lab scenario list`.

Errors are LabErrors (the CLI prints one line, exit 4); `run` returns 0 when every expectation
holds, 1 otherwise. The lab is a context manager: Ctrl-C tears it down (the CLI prints that).
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from emulator import rules
from emulator.catalog import load_catalog
from emulator.errors import LabError
from emulator.lab import Lab, preflight
from emulator.scenario.runner import Runner, ScenarioResult, generated_ruleset
from emulator.scenario.schema import SCENARIOS_DIR, Scenario, load_scenario

EXIT_EXPECTATION_FAILED = 1


def add_arguments(subparsers) -> None:
    """The `scenario` command and its actions, on the CLI's top-level subparsers."""
    scenario = subparsers.add_parser("scenario", help="run a scenario: workflows, failures and what to expect")
    actions = scenario.add_subparsers(dest="scenario_command", required=True, metavar="ACTION")
    run_parser = actions.add_parser("run", help="build the scenario's lab, run its steps in words, print a "
                                                "pass/fail table of its expectations, tear down")
    run_parser.add_argument("file", metavar="FILE", help="a name in scenarios/ or the path of a scenario .yaml")
    run_parser.add_argument("--step", action="store_true", help="wait for Enter before each step")
    actions.add_parser("list", help="the scenarios in scenarios/ with their one-line descriptions")


def run(args, out: TextIO = sys.stdout, stdin: TextIO = sys.stdin) -> int:
    if args.scenario_command == "list":
        return list_scenarios(out)
    return run_file(args.file, out, pause=enter_pause(stdin, out) if args.step else None)


def list_scenarios(out: TextIO) -> int:
    catalog = load_catalog()
    paths = sorted(SCENARIOS_DIR.glob("*.yaml"))
    for path in paths:
        try:
            scenario = load_scenario(path, catalog)
        except LabError as exc:
            print(f"{path.stem:36} (invalid: {exc})", file=out)
            continue
        needs = "  [needs link impairments]" if scenario.needs_impairments else ""
        print(f"{scenario.name:36} {scenario.description}{needs}", file=out)
    if not paths:
        print(f"no scenarios in {SCENARIOS_DIR}", file=out)
    return 0


def enter_pause(stdin: TextIO, out: TextIO) -> Callable[[str], None]:
    """Wait for Enter before each step; at the end of input (Ctrl-D) the rest runs without pausing."""
    state = {"done": False}

    def pause(label: str) -> None:
        if state["done"]:
            return
        print(f"[Enter] {label} ", end="", file=out, flush=True)
        if stdin.readline() == "":
            state["done"] = True
            print("(end of input: the remaining steps run without pausing)", file=out, flush=True)
    return pause


def scenario_rulesets(scenario: Scenario) -> dict[str, rules.Ruleset]:
    """firewall node -> its ruleset: generated from the catalog, or the scenario's file (validated)."""
    topology = scenario.topology
    chosen = {}
    for node, source in scenario.rules.items():
        if source == "generated":
            chosen[node] = generated_ruleset(topology, node)
        else:
            owner = f"{'firewall node' if topology.is_firewall(node) else 'host'} {node} of topology {topology.name}"
            chosen[node] = rules.load_rules_file(str(source), rules.node_interfaces(topology, node), owner)
    return chosen


def lab_options(scenario: Scenario) -> dict:
    """Lab(...) keywords: the links the scenario impairs get a shaper (emulator.impair)."""
    return {"impairable": list(scenario.impairable)} if scenario.needs_impairments else {}


def run_file(name_or_path: str, out: TextIO = sys.stdout, pause: Callable[[str], None] | None = None,
             lab_class=None) -> int:
    """Validate, build the lab, run, tear down; 0 when every expectation holds."""
    result = run_scenario(name_or_path, out, pause, lab_class)
    return 0 if result.passed else EXIT_EXPECTATION_FAILED


def run_scenario(name_or_path: str, out: TextIO = sys.stdout, pause: Callable[[str], None] | None = None,
                 lab_class=None) -> ScenarioResult:
    """Validate, build the lab, run, tear down; what each expectation and workflow observed."""
    catalog = load_catalog()
    scenario = load_scenario(name_or_path, catalog)  # every check happens before anything is built
    rulesets = scenario_rulesets(scenario)
    options = lab_options(scenario)
    if lab_class is None:
        preflight()
        lab_class = Lab
    started = time.monotonic()
    print(f"Building the lab {scenario.topology.name} ({len(scenario.topology.hosts)} hosts) ...", file=out, flush=True)
    with lab_class(scenario.topology, catalog, **options) as lab:
        lab.apply_rules(rulesets)
        print(f"The lab is up in {time.monotonic() - started:.1f} s; rules: "
              + "; ".join(f"{node}: {r.source}" for node, r in rulesets.items()), file=out, flush=True)
        result = Runner(scenario, lab, rulesets, out, pause).run()
    print(f"The lab was torn down ({time.monotonic() - started:.1f} s in all).", file=out, flush=True)
    return result
