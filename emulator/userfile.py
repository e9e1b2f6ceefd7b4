"""A file the user hands us (a topology, a ruleset), read with the refusals both need: too large,
unreadable, empty, not UTF-8. Each refusal is a one-line LabError naming the file and the fix."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from emulator.errors import LabError


@dataclass(frozen=True)
class Expected:
    """What a kind of file must be, in words for its errors."""
    label: str        # how an error names the file: "rules file {path}:", "{path}:"
    what: str         # "a ruleset", "a topology file"
    give: str         # what to give instead of another file: "an iptables-save or nft ruleset"
    max_bytes: int
    when_empty: str   # the fix for an empty file
    encoding_fix: str  # the fix for bytes that are not UTF-8


def _size(n: int) -> str:
    return f"{n // (1 << 20)} MiB" if n % (1 << 20) == 0 and n >= 2 << 20 else f"{n // 1024} KiB"


def read_text(path: Path, expected: Expected) -> str:
    """The file's text (a byte-order mark dropped, so line numbers stay the same)."""
    label = expected.label.format(path=path)
    try:
        size = path.stat().st_size
        if size > expected.max_bytes:
            raise LabError(f"{label} {size} bytes; {expected.what} is at most {_size(expected.max_bytes)} here: "
                           f"give {expected.give}, not another file")
        data = path.read_bytes()
    except OSError as exc:
        raise LabError(f"{label} cannot be read ({exc.strerror or exc.__class__.__name__}); "
                       "check the path and its permissions") from None
    if not data.strip():
        raise LabError(f"{label} the file is empty; {expected.when_empty}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise LabError(f"{label} not readable text (line {line}: byte 0x{data[exc.start]:02x} is not UTF-8); "
                       f"{expected.encoding_fix}") from None
