"""safeq-lab: an emulator of a YSoft SafeQ 6 print-management network for firewall testing.

`from emulator import SafeqLab` (see emulator.api). Names here are imported on first use: importing
the package loads neither Mininet nor Twisted (the zygote forks daemons from a process without a
reactor, and the command line starts fast).
"""
from __future__ import annotations

import importlib

# public name -> the module that defines it
_LAZY = {"SafeqLab": "emulator.api", "run_scenario": "emulator.api", "LabError": "emulator.errors",
         "AuditReport": "emulator.audit", "FlowVerdict": "emulator.audit", "Verdict": "emulator.evidence",
         "Lab": "emulator.lab"}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version
        try:
            return version("safeq-lab")
        except PackageNotFoundError:  # a source tree that was never installed
            return "0+unknown"
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'emulator' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
