"""Vendor alternatives as data: groups of options a site chooses among (alternatives.yaml).

The deployment profile (emulator.profile) names the options a site uses; the planner requires
only those. Validated against the flow catalog on load; errors name the file, group and field.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import yaml

from emulator.catalog import HERE, Catalog, CatalogError, Endpoint, Flow, load_catalog

ALTERNATIVES_PATH = HERE / "alternatives.yaml"


@dataclass(frozen=True)
class Option:
    flows: frozenset[str] = frozenset()
    ports: frozenset[int] = frozenset()

    def selects(self, flow: Flow, endpoint: Endpoint) -> bool:
        if self.flows:
            return flow.id in self.flows
        return endpoint.port in self.ports


@dataclass(frozen=True)
class AlternativeGroup:
    name: str
    description: str
    flows: frozenset[str]
    options: Mapping[str, Option]
    default: tuple[str, ...]

    def covers(self, flow: Flow, endpoint: Endpoint) -> bool:
        """True when the endpoint is one of the group's alternatives (chosen or not)."""
        return flow.id in self.flows and any(o.selects(flow, endpoint) for o in self.options.values())

    def chosen(self, flow: Flow, endpoint: Endpoint, picked: tuple[str, ...] | None) -> bool:
        return any(self.options[name].selects(flow, endpoint) for name in (picked or self.default))


def _fail(group: str, field: str, problem: str) -> CatalogError:
    return CatalogError(f"{ALTERNATIVES_PATH}: group {group!r}: field {field!r}: {problem}")


def _parse(name: str, raw, catalog: Catalog) -> AlternativeGroup:
    if not isinstance(raw, dict) or set(raw) - {"description", "flows", "options", "default"}:
        raise _fail(name, "-", "expected description, flows, options, default")
    flows = raw.get("flows") or []
    for flow_id in flows:
        catalog.flow(flow_id)
    options = {}
    for option_name, option in (raw.get("options") or {}).items():
        if not isinstance(option, dict) or len(option) != 1 or next(iter(option)) not in ("flows", "ports"):
            raise _fail(name, f"options.{option_name}", "expected {flows: [...]} or {ports: [...]}")
        if "flows" in option:
            unknown = set(option["flows"]) - set(flows)
            if unknown:
                raise _fail(name, f"options.{option_name}.flows", f"{sorted(unknown)} are not in the group's flows")
            options[option_name] = Option(flows=frozenset(option["flows"]))
        else:
            ports = frozenset(option["ports"])
            offered = {ep.port for f in flows for ep in catalog.flow(f).endpoints}
            if not ports or not ports <= offered:
                raise _fail(name, f"options.{option_name}.ports", f"{sorted(ports - offered)} not offered by the group's flows")
            options[option_name] = Option(ports=ports)
    default = tuple(raw.get("default") or ())
    if not default or set(default) - set(options):
        raise _fail(name, "default", f"expected option names among {', '.join(options)}")
    return AlternativeGroup(name, str(raw.get("description", "")), frozenset(flows), options, default)


@functools.lru_cache(maxsize=1)
def load_alternatives(path: Path = ALTERNATIVES_PATH) -> dict[str, AlternativeGroup]:
    catalog = load_catalog()
    raw = yaml.safe_load(Path(path).read_text()) or {}
    return {name: _parse(name, entry, catalog) for name, entry in raw.items()}
