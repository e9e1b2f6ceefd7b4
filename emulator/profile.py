"""A site's deployment profile: the choices the vendor leaves to the site, which the audit follows.

* ``version``: the SafeQ 6 maintenance update (``MU38``). From MU38 on, JMX listens on localhost
  only, so remote JMX is an exposure; earlier versions listen on every interface.
* ``security``: ``mixed`` (plain and secured variants of a flow are both required) or
  ``secured-only`` (plain variants of flows that have a secured port must be closed).
* ``choices``: which option of each vendor alternative the site uses, by group name
  (``emulator/catalog/alternatives.yaml``: ``database: pgsql``, ``pgsql-port: embedded``, ...).

Pure data and validation; errors name the topology file and the field.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from emulator.catalog.alternatives import load_alternatives
from emulator.errors import LabError

SECURITY_MODES = ("mixed", "secured-only")
JMX_LOCALHOST_FROM = 38  # MU38: JMX binds to localhost only (vendor document)
DEFAULT_VERSION = f"MU{JMX_LOCALHOST_FROM}"
_VERSION = re.compile(r"^MU(\d{1,3})$")


@dataclass(frozen=True)
class DeploymentProfile:
    version: str = DEFAULT_VERSION
    security: str = "mixed"
    choices: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def update(self) -> int:
        return int(_VERSION.match(self.version).group(1))

    @property
    def jmx_remote(self) -> bool:
        """True when JMX listens on every interface (before MU38)."""
        return self.update < JMX_LOCALHOST_FROM

    @property
    def secured_only(self) -> bool:
        return self.security == "secured-only"

    def to_dict(self) -> dict:
        return {"version": self.version, "security": self.security,
                "choices": {k: list(v) for k, v in self.choices.items()}}


def parse_profile(path: Path | str, raw) -> DeploymentProfile:
    """The `profile:` mapping of a topology file (None: the defaults)."""
    if raw is None:
        return DeploymentProfile()
    where = f"{path}: profile"
    if not isinstance(raw, dict):
        raise LabError(f"{where}: expected a mapping with version, security, choices")
    unknown = set(raw) - {"version", "security", "choices"}
    if unknown:
        raise LabError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; allowed: version, security, choices")
    version = str(raw.get("version", DEFAULT_VERSION))
    if not _VERSION.match(version):
        raise LabError(f"{where}.version: {version!r} is not a maintenance update such as {DEFAULT_VERSION}")
    security = raw.get("security", "mixed")
    if security not in SECURITY_MODES:
        raise LabError(f"{where}.security: {security!r}; use one of {', '.join(SECURITY_MODES)}")
    choices_raw = raw.get("choices") or {}
    if not isinstance(choices_raw, dict):
        raise LabError(f"{where}.choices: expected a mapping of alternative group to option(s)")
    groups = load_alternatives()
    choices = {}
    for group, picked in choices_raw.items():
        if group not in groups:
            raise LabError(f"{where}.choices.{group}: unknown alternative group; known: {', '.join(sorted(groups))}")
        options = (picked,) if isinstance(picked, str) else tuple(picked) if isinstance(picked, list) else None
        if not options or not all(isinstance(o, str) for o in options):
            raise LabError(f"{where}.choices.{group}: expected an option name or a list of them")
        for option in options:
            if option not in groups[group].options:
                raise LabError(f"{where}.choices.{group}: unknown option {option!r}; "
                               f"options: {', '.join(groups[group].options)}")
        choices[group] = options
    return DeploymentProfile(version, security, MappingProxyType(choices))
