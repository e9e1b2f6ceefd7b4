"""Persona files in a topology (`personas:` and a host's `persona:`): loaded, checked, refused in one line."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from emulator.errors import LabError
from emulator.topology import load_topology

DATA = Path(__file__).resolve().parents[1] / "data" / "personas"


def topology(tmp_path: Path, personas: str = "[recorded.yaml]", persona: str = "recorded") -> Path:
    path = tmp_path / "t.yaml"
    path.write_text(f"name: t\nfirewall: fw\npersonas: {personas}\nzones:\n"
                    "  - name: devices\n    subnet: 198.18.102.0/24\n    hosts:\n"
                    f"      - {{name: mfd1, roles: [mfd], persona: {persona}}}\n"
                    "      - {name: mfd2, roles: [mfd]}\n")
    return path


def write_persona(tmp_path: Path, entry) -> None:
    (tmp_path / "recorded.yaml").write_text(yaml.safe_dump({"recorded": entry}))


def test_a_host_gets_the_named_persona_and_others_none(tmp_path):
    entry = {"vendor": "Ricoh", "make_model": "RICOH IM C3000",
             "snmp_objects": {"1.3.6.1.2.1.1.5.0": {"type": "string", "value": "RNP1"}}}
    write_persona(tmp_path, entry)
    t = load_topology(str(topology(tmp_path)), known_roles={"mfd"})
    assert t.host("mfd1").persona == "recorded" and t.host("mfd2").persona == ""
    assert t.personas["recorded"] == entry


@pytest.mark.parametrize("personas, persona, entry, message", [
    ("[recorded.yaml]", "nobody", {"vendor": "x"}, "unknown persona 'nobody'"),
    ("[missing.yaml]", "recorded", {"vendor": "x"}, "missing.yaml does not exist"),
    ("recorded.yaml", "recorded", {"vendor": "x"}, "expected a list of persona files"),
    ("[recorded.yaml]", "recorded", ["not", "a", "mapping"], "expected `name: {persona fields}` entries"),
    ("[recorded.yaml]", "recorded", {"snmp_objects": {"1.3.x": {"type": "string", "value": "v"}}}, "persona 'recorded'"),
    ("[recorded.yaml]", "recorded", {"ipp_attributes": {"copies-supported": {"syntax": "rangeOfInteger", "values": ["x"]}}},
     "persona 'recorded'"),
])
def test_bad_persona_files_are_refused_in_one_line(tmp_path, personas, persona, entry, message):
    write_persona(tmp_path, entry)
    with pytest.raises(LabError) as caught:
        load_topology(str(topology(tmp_path, personas, persona)), known_roles={"mfd"})
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_an_empty_persona_file_says_how_to_write_one(tmp_path):
    (tmp_path / "recorded.yaml").write_text("")
    with pytest.raises(LabError, match="persona import"):
        load_topology(str(topology(tmp_path)), known_roles={"mfd"})
