"""The audit's terminal: progress while the lab builds and probes, coloured verdicts on a terminal.

Progress goes to standard error, the report to standard output. On a terminal progress is a
`rich` progress bar (one step per phase: the lab's build, each audit phase of
emulator.audit.AUDIT_PHASES, the report files) and verdicts are coloured; otherwise (a pipe, a
file, CI) progress is one plain line per phase once the lab is up, and nothing carries an escape sequence. `NO_COLOR`
(https://no-color.org, any non-empty value) turns colours off on a terminal too. `quiet` shows no
progress at all.
"""
from __future__ import annotations

import os
import re
import sys
import time
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

PREFIX = "safeq-lab: "
# verdict words and the matrix's codes -> their colour
_STYLES = {"BLOCKED": "bold red", "BROKEN": "bold red", "EXPOSED": "bold red", "UNENCRYPTED": "yellow",
           "LAB-ERROR": "magenta", "NO-SERVICE": "magenta", "ALLOWED": "green", "PASS": "bold green",
           "FAIL": "bold red", "CLOSED": "dim", "SAME-SEGMENT": "cyan"}
_WORDS = re.compile(r"\b(" + "|".join(re.escape(w) for w in sorted(_STYLES, key=len, reverse=True)) + r")\b")
_CODES = re.compile(r"(?<![\w-])(?:([BXE])|(U)|(L))\d+\b|(?<![\w-])(ok \d+)\b")
_CODE_STYLES = ("bold red", "yellow", "magenta", "green")


def colours_wanted(stream: TextIO, environ=os.environ) -> bool:
    """Colours only on a terminal, and never with NO_COLOR set (to anything but the empty string)."""
    return bool(environ.get("NO_COLOR", "") == "" and hasattr(stream, "isatty") and stream.isatty())


def styled(line: str) -> Text:
    """A report line with its verdict words and matrix codes coloured (the text itself unchanged)."""
    text = Text(line)
    for match in _WORDS.finditer(line):
        text.stylize(_STYLES[match.group(1)], match.start(), match.end())
    for match in _CODES.finditer(line):
        style = next(s for group, s in zip(match.groups(), _CODE_STYLES) if group)
        text.stylize(style, match.start(), match.end())
    return text


class AuditConsole:
    """Progress on standard error, the report on standard output (see the module docstring)."""

    def __init__(self, quiet: bool = False, out: TextIO | None = None, err: TextIO | None = None, environ=os.environ):
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.quiet = quiet
        self._colour_out = colours_wanted(self.out, environ)
        self._bar: Progress | None = None
        self._task = None
        self._started = time.monotonic()
        if not quiet and hasattr(self.err, "isatty") and self.err.isatty():
            console = Console(file=self.err, no_color=not colours_wanted(self.err, environ), highlight=False)
            self._bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console, transient=True)

    # -- progress -------------------------------------------------------------------------------
    def begin(self, steps: int, words: str) -> None:
        """The whole run takes `steps` steps; the first one starts now. Without a terminal this says
        nothing: a bad input found while the lab is built stays the one line on standard error."""
        self._started = time.monotonic()
        if self._bar is not None:
            self._bar.start()
            self._task = self._bar.add_task(words, total=steps)

    def step(self, words: str) -> None:
        """The previous step is done, the next one starts."""
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, advance=1, description=words)
        else:
            self._plain(words)

    def note(self, line: str) -> None:
        """A line that stays (above the bar on a terminal): e.g. the lab is up."""
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.console.print(Text(line), soft_wrap=True)
        else:
            print(line, file=self.err, flush=True)

    def progress(self, phase: str, words: str) -> None:
        """The callback emulator.audit.run_audit takes."""
        self.step(words)

    def end(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar, self._task = None, None

    def _plain(self, words: str) -> None:
        if not self.quiet:
            print(f"{PREFIX}{words} ({time.monotonic() - self._started:.1f}s)", file=self.err, flush=True)

    # -- the report -----------------------------------------------------------------------------
    def report(self, text: str) -> None:
        """The report on standard output: coloured on a terminal, plain text otherwise."""
        self.end()
        if not self._colour_out:
            print(text, file=self.out, flush=True)
            return
        console = Console(file=self.out, highlight=False, soft_wrap=True)
        for line in text.split("\n"):
            console.print(styled(line), soft_wrap=True)

    def __enter__(self) -> "AuditConsole":
        return self

    def __exit__(self, *exc_info) -> None:
        self.end()
