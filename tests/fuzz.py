"""How hard the fuzz tests try: a quick default in CI, more with TWOWAY_FUZZ_SCALE=N."""

from __future__ import annotations

import os

SCALE = max(1, int(os.environ.get("TWOWAY_FUZZ_SCALE", "1")))


def examples(default: int) -> int:
    """`default` examples per property, times TWOWAY_FUZZ_SCALE (e.g. 50 for a long run)."""
    return default * SCALE
