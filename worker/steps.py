"""Work done a part at a time, to fill the waits of other work.

A `Steps[T]` is a generator that pauses (yields None) between the parts of a job and
returns its result T. The send path runs the next email's parts (rendering, composing)
while it waits for the SMTP server's replies to the current one (worker.outbox,
Mailer.begin); everywhere else `drain` runs all of them at once.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import ParamSpec, TypeVar

_T = TypeVar("_T")
_P = ParamSpec("_P")

Steps = Generator[None, None, _T]


def drain(steps: Steps[_T]) -> _T:
    """Run every part of `steps` now; its result."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            result: _T = done.value
            return result


def drained(job: Callable[_P, Steps[_T]]) -> Callable[_P, _T]:
    """`job` run to its end at each call: the one-go form of a function in steps."""

    def run(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        return drain(job(*args, **kwargs))

    run.__name__ = job.__name__.removesuffix("_steps")
    run.__doc__ = f"`{job.__name__}` run at once."
    return run
