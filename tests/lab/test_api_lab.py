"""The Python API's documented example (emulator.api, README "Python API"), run as it is written."""
from __future__ import annotations

import contextlib
import io

import pytest

import emulator.api
from emulator.report import diff
from tests.lab.helpers import footprint, small_topology

pytestmark = pytest.mark.lab
CLEAN = {"bridges": [], "processes": [], "state": [], "mininet_shells": []}


def documented_example() -> str:
    """The example in emulator.api's docstring (the README shows the same text), dedented."""
    lines = emulator.api.__doc__.splitlines()
    start = lines.index("    from emulator import SafeqLab")
    block = []
    for line in lines[start:]:
        if line and not line.startswith("    "):
            break
        block.append(line[4:])
    return "\n".join(block).strip() + "\n"


def test_the_documented_example_runs_and_tears_down(lab_host):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(documented_example(), "README example", "exec"), {"__name__": "example"})
    lines = out.getvalue().splitlines()
    allowed = [l for l in lines if l.endswith(" ALLOWED") or l.endswith(" UNENCRYPTED")]
    assert len(allowed) == 8 and any(l.startswith("5021/tcp soap") for l in allowed), lines
    assert "{'BLOCKED': 8}" in lines, lines
    rule, fix = lines[-2], lines[-1]
    assert rule.startswith("fw") and "FORWARD" in rule and "DROP" in rule, rule
    assert fix.startswith("-A FORWARD") and "ACCEPT" in fix, fix
    assert footprint() == CLEAN


def test_rules_from_a_file_and_a_differential_on_a_small_lab(lab_host, tmp_path):
    with emulator.api.SafeqLab(small_topology(tmp_path), rules="generated") as lab:
        generated = lab.rulesets["fw"].text
        dropped = tmp_path / "drop-5021.rules"
        dropped.write_text(generated.replace(
            "-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            "-A FORWARD -p tcp -m tcp --dport 5021 -j DROP\n"
            "-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"))
        before, after = lab.compare("generated", str(dropped), client="km1")
        assert before.exit_status == 0, [(v.check.key, v.verdict, v.detail) for v in before.verdicts][:5]
        changed = [(old.check, new) for old, new in diff(before, after)]
        assert changed and all(c.endpoint.port == 5021 and new.verdict == "BLOCKED" for c, new in changed)
        assert all(f"{dropped}:" in new.rule and "--dport 5021 -j DROP" in new.rule for _c, new in changed)
        assert lab.rulesets["fw"].source == str(dropped)
    assert footprint() == CLEAN


def test_an_exception_in_the_block_still_tears_the_lab_down(lab_host, tmp_path):
    with pytest.raises(ZeroDivisionError):
        with emulator.api.SafeqLab(small_topology(tmp_path)) as lab:
            assert lab.running and lab.lab.run_id
            1 / 0
    assert not lab.running
    assert footprint() == CLEAN


def test_a_scenario_runs_in_its_own_lab_and_returns_its_result(lab_host):
    out = io.StringIO()
    result = emulator.api.run_scenario("time-sync-blocked", out=out)
    assert result.passed and result.expectations and all(e.held for e in result.expectations)
    assert "Scenario time-sync-blocked" in out.getvalue()
    assert footprint() == CLEAN
