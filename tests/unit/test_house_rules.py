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


# Role ids that are also ordinary words of a protocol, so they may appear in protocol modules:
#   user        - every protocol has users (ftp_user, user[...] templates, USER commands)
#   management  - JMX's javax.management, "print management", "remote management"
#   spooler     - a print spooler is the IPP/LPD client in general; the terminal job record's field
#   file-system - SMB's file-system information classes
#   infinispan  - also the catalog's wire protocol id of the Infinispan REST API (PROTOCOL_IDS)
ORDINARY_WORDS = {"user", "management", "spooler", "file-system", "infinispan"}


def test_protocol_modules_name_no_catalog_flow_or_role():
    """Protocol modules know bytes, not flows: per-flow requests arrive as ProbeTarget.options and
    per-role data as Persona.identity, both resolved in roles/."""
    catalog = load_catalog()
    names = {flow.id for flow in catalog.flows} | (set(catalog.roles) - ORDINARY_WORDS)
    # a whole token: not part of a longer id (mfd-* is a prefix, terminal-server-1 a host name) nor a
    # URL path segment (/ims/register is the wire path of the IMS API, not a role)
    token = re.compile(r"(?<![\w/-])(" + "|".join(map(re.escape, sorted(names, key=len, reverse=True)))
                       + r")(?![\w-])")
    offenders = []
    for path in sorted((ROOT / "emulator" / "protocols").rglob("*")):
        if path.suffix not in (".py", ".yaml", ".yml") or not path.is_file():
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            offenders += [f"{path.relative_to(ROOT)}:{lineno}: {m.group(1)}" for m in token.finditer(line)]
    assert offenders == []
