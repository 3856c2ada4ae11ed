"""Case-insensitive regexes that are quick on ASCII text.

Python's `re` tries a case-insensitive alternation branch by branch at every position of
the text; a case-sensitive one skips at once every branch whose first letter is not the
one there, and finds a literal prefix with a fast scan. For the long word lists of
classification that is a tenth of the time. So `Caseless` keeps two compiled forms of
one pattern: the case-insensitive one, used on any text, and a case-sensitive one, used
on ASCII text after lower-casing it, which finds the same matches:

- `str.lower()` maps an ASCII text to one of the same length, character for character,
  so every position (and every `\\b`, `\\w`, `\\s`, `\\d`) is unchanged;
- the pattern has no upper-case letter, so each of its letters matches, case-sensitively
  in the lower-cased text, exactly the characters it matches case-insensitively in the
  text;
- the four non-ASCII letters that match an ASCII one case-insensitively (dotted and
  dotless i, long s, the Kelvin sign) are written as that ASCII letter in the
  case-sensitive form; case-insensitively they are the same pattern.

tests/test_caseless.py checks the last two for every pattern, letter by letter.
A match found on ASCII text is a match in the lower-cased text: its positions and group
names are those of the text, its `group()` strings are lower-cased.
"""

from __future__ import annotations

import re
import sys

__all__ = ["ASCII_TWINS", "Caseless"]

# The only non-ASCII characters that IGNORECASE matches with an ASCII letter.
ASCII_TWINS = {"\u0130": "i", "\u0131": "i", "\u017f": "s", "\u212a": "k"}
_TWINS_TABLE = str.maketrans(ASCII_TWINS)


class Caseless:
    """A case-insensitive `pattern` (without `(?i)`), compiled with `flags`."""

    __slots__ = ("_any", "_ascii", "flags", "pattern")

    def __init__(self, pattern: str, flags: int = 0) -> None:
        self.pattern = pattern
        self.flags = flags
        self._any = re.compile(pattern, flags | re.IGNORECASE)
        self._ascii = re.compile(pattern.translate(_TWINS_TABLE), flags & ~re.IGNORECASE)

    def search(self, text: str, pos: int = 0, endpos: int = sys.maxsize) -> re.Match[str] | None:
        """`re.search` of the case-insensitive pattern (see the module's note on groups)."""
        if text.isascii():
            return self._ascii.search(text.lower(), pos, endpos)
        return self._any.search(text, pos, endpos)

    def match(self, text: str, pos: int = 0, endpos: int = sys.maxsize) -> re.Match[str] | None:
        """`re.match` of the case-insensitive pattern (see the module's note on groups)."""
        if text.isascii():
            return self._ascii.match(text.lower(), pos, endpos)
        return self._any.match(text, pos, endpos)
