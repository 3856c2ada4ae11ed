"""A `Caseless` pattern finds on ASCII text what its case-insensitive form finds.

The proof is per letter (see worker/caseless.py): every character the pattern names,
alone or in a class, must match an ASCII character case-insensitively exactly when its
case-sensitive form (the ASCII twin for the four non-ASCII letters) matches that
character lower-cased. The structure of the two forms is the same, so their matches are.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

import worker.bounces
import worker.classify
import worker.replytext
from worker.caseless import ASCII_TWINS, Caseless

_parser: Any = getattr(re, "_parser")  # noqa: B009  (the stdlib's own regex parser)
_c: Any = getattr(re, "_constants")  # noqa: B009

ASCII = [chr(a) for a in range(128)]


def _all_caseless() -> Iterator[tuple[str, Caseless]]:
    for module in (worker.classify, worker.replytext, worker.bounces):
        for name, value in vars(module).items():
            if isinstance(value, Caseless):
                yield f"{module.__name__}.{name}", value
            elif isinstance(value, tuple | list):
                for i, item in enumerate(value):
                    pair = item if isinstance(item, tuple) else (item,)
                    for part in pair:
                        if isinstance(part, Caseless):
                            yield f"{module.__name__}.{name}[{i}]", part


CASELESS = dict(_all_caseless())


def _char_items(tree: Any) -> Iterator[tuple[str, int, int]]:
    """("literal" | "range", low, high) for every character the parsed pattern names;
    raises on what the per-letter proof does not cover (flags turned off, back-refs)."""
    for op, av in tree.data if hasattr(tree, "data") else tree:
        if op in (_c.LITERAL, _c.NOT_LITERAL):
            yield "literal", av, av
        elif op is _c.RANGE:
            yield "range", av[0], av[1]
        elif op is _c.IN:
            yield from _char_items(av)
        elif op is _c.BRANCH:
            for branch in av[1]:
                yield from _char_items(branch)
        elif op is _c.SUBPATTERN:
            _group, add_flags, del_flags, sub = av
            assert not del_flags & re.IGNORECASE, "(?-i:...) is not caseless"
            if not add_flags & re.IGNORECASE:  # (?i:...) stays case-insensitive in both
                yield from _char_items(sub)
        elif op in (_c.MAX_REPEAT, _c.MIN_REPEAT, _c.POSSESSIVE_REPEAT):
            yield from _char_items(av[2])
        elif op in (_c.ASSERT, _c.ASSERT_NOT):
            yield from _char_items(av[1])
        elif op is _c.ATOMIC_GROUP:
            yield from _char_items(av)
        else:
            assert op in (_c.AT, _c.ANY, _c.CATEGORY, _c.NEGATE), f"not covered: {op}"


def _mismatches(pattern: Caseless) -> list[str]:
    """The characters of `pattern` whose two forms disagree on some ASCII character."""
    out = []
    if re.compile(pattern.pattern, pattern.flags).flags & re.IGNORECASE:
        out.append("(?i) in the pattern: its ASCII form is not case-sensitive")
    tree = _parser.parse(pattern.pattern, pattern.flags | re.IGNORECASE)
    for kind, low, high in _char_items(tree):
        if kind == "literal":
            item = re.escape(chr(low))
            twin = re.escape(ASCII_TWINS.get(chr(low), chr(low)))
        elif any(low <= ord(t) <= high for t in ASCII_TWINS):
            out.append(f"a twin in the range {chr(low)!r}-{chr(high)!r}")
            continue
        else:
            item = twin = f"[{re.escape(chr(low))}-{re.escape(chr(high))}]"
        caseless, sensitive = re.compile(item, re.IGNORECASE), re.compile(twin)
        out += [
            f"{chr(low)!r}..{chr(high)!r} on {a!r}"
            for a in ASCII
            if bool(caseless.fullmatch(a)) != bool(sensitive.fullmatch(a.lower()))
        ]
    return out


@pytest.mark.parametrize("name", sorted(CASELESS))
def test_it_matches_every_letter_of_ascii_text_as_ignorecase_does(name: str) -> None:
    assert _mismatches(CASELESS[name]) == []


def test_the_proof_finds_upper_case_letters_and_twins_in_ranges() -> None:
    assert _mismatches(Caseless("out|Office")) == ["'O'..'O' on 'O'", "'O'..'O' on 'o'"]
    assert _mismatches(Caseless("[a-\u017f]")) == ["a twin in the range 'a'-'ſ'"]
    with pytest.raises(AssertionError, match="not caseless"):
        _mismatches(Caseless("(?-i:x)"))


def test_the_twins_are_the_same_letters_ignoring_case() -> None:
    for twin, letter in ASCII_TWINS.items():
        assert re.fullmatch(letter, twin, re.IGNORECASE)
        assert {c for c in ASCII if re.fullmatch(twin, c, re.IGNORECASE)} == {
            letter,
            letter.upper(),
        }


def test_it_finds_the_same_match_as_ignorecase() -> None:
    words = Caseless(r"\bout\s+of\s+(?:the\s+)?office|dışında|(?P<x>ſtop)")
    for text in ("I am OUT OF THE Office", "ofis DIŞINDA", "DISINDA", "STOP now", "nothing"):
        want = re.search(words.pattern, text, re.IGNORECASE)
        got = words.search(text)
        assert (got and got.span(), got and got.lastgroup) == (
            want and want.span(),
            want and want.lastgroup,
        )
