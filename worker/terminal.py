"""Text for a terminal: what twoway prints never drives the terminal it is printed on.

Lead names, companies and custom fields come from CSV files; subjects, senders and reply
text from anyone who can send mail. An ESC in any of them (`\\x1b]0;…\\x07` retitles the
window, `\\x1b[2J` clears the screen, OSC 52 writes the clipboard, a carriage return
overwrites the line already shown) would reach the terminal of whoever runs `twoway leads
show`. `printable` is the one function every printer of the `twoway` command passes its
text through.
"""

from __future__ import annotations

import io
import re
from typing import TextIO, cast

# C0 controls but tab and newline, DEL, the C1 controls (U+009B is a one-character CSI on
# terminals that honour 8-bit controls) and the bidirectional embeddings, overrides and
# isolates that reorder what is shown (CVE-2021-42574).
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _escape(m: re.Match[str]) -> str:
    return f"\\u{ord(m.group()):04x}"


def printable(text: str) -> str:
    """`text` with every control character but tab and newline written as `\\uXXXX`.

    The escape is JSON's own, so JSON text stays the same JSON (a string holding U+009B
    reads back as U+009B) and a person sees where the character was. Linear in the
    length of `text`.
    """
    return _UNSAFE.sub(_escape, text)


_BREAKS = re.compile("[\t\n\x0b\x0c\r\u2028\u2029]")


def one_line(value: object) -> str:
    """`value` as text for one cell of a one-line row: line breaks and tabs written as
    `\\uXXXX` too, so a CSV field holding a newline cannot print a row of its own."""
    return printable(_BREAKS.sub(_escape, str(value)))


class _Shown(io.TextIOBase):
    """A text stream that writes through `printable` (see `shown_on_terminal`)."""

    def __init__(self, out: TextIO) -> None:
        self._out = out

    def write(self, text: str) -> int:
        self._out.write(printable(text))
        return len(text)

    def flush(self) -> None:
        self._out.flush()


def shown_on_terminal(out: TextIO) -> TextIO:
    """`out` itself when it is a file or a pipe (data such as `twoway export` must reach
    it byte for byte), else a stream that passes what is written through `printable`."""
    return cast(TextIO, _Shown(out)) if out.isatty() else out
