"""House rules the code base keeps: ports live in the catalog only."""
import re
from pathlib import Path

from emulator.catalog import load_catalog

ROOT = Path(__file__).resolve().parents[2]
ADDRESS = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?:/\d{1,2})?\b")


def catalog_ports():
    ports = set()
    for flow in load_catalog().flows:
        for ep in flow.endpoints:
            if ep.port:
                ports.add(ep.port)
    return ports


def test_no_port_literals_in_roles_scenarios_topologies():
    ports = catalog_ports()
    offenders = []
    for folder in ("roles", "scenarios", "topologies"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix not in (".py", ".yaml", ".yml") or not path.is_file():
                continue
            for lineno, line in enumerate(path.read_text().splitlines(), 1):
                code = ADDRESS.sub("", line.split("#", 1)[0])
                for number in re.findall(r"(?<![\w.-])(\d{2,5})(?![\w.])", code):
                    if int(number) in ports:
                        offenders.append(f"{path.relative_to(ROOT)}:{lineno}: {number}")
    assert offenders == []
