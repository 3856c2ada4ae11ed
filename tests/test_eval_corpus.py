"""The corpus evaluation keeps its level: a floor per headline figure, not a timing.

Runs bench/eval_corpus.py's scoring on `../shared/corpus` (skipped where that corpus is
not present) and on our own tests/emails, and fails when a figure drops below the level
reached when the floors were set (bench/README.md has the figures).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "eval_corpus.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("eval_corpus", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["eval_corpus"] = module
    spec.loader.exec_module(module)
    return module


EVAL = _load()
CORPUS: Path = EVAL._default_corpus()

FLOORS = {
    "kind accuracy": 1.0,
    "human-reply precision": 1.0,
    "reply recall": 1.0,
    "auto_reply recall": 1.0,
    "bounce recall": 1.0,
    "complaint recall": 1.0,
    "notification recall": 1.0,
    "bounce hard/soft agreement": 1.0,
    "failed-recipient accuracy": 0.989,
    "reply-text checks": 0.983,
}


@pytest.mark.skipif(not CORPUS.is_dir(), reason="../shared/corpus is not here")
def test_it_keeps_every_headline_figure_on_the_shared_corpus_above_its_floor() -> None:
    figures = EVAL.headline(EVAL.evaluate(CORPUS))
    below = {}
    for name, floor in FLOORS.items():
        hits, total = figures[name]
        assert total > 0, name
        if hits / total < floor:
            below[name] = f"{hits}/{total} < {floor}"
    assert not below


def test_it_scores_our_own_labelled_mail_without_a_miss() -> None:
    ours = EVAL.eval_ours(Path(__file__).resolve().parent / "emails")
    assert ours.kind_accuracy()[0] == ours.kind_accuracy()[1] >= 150
    for values in (ours.hard_soft, ours.recipients, ours.reasons, ours.return_dates):
        assert values and all(values)
    assert not ours.misses
