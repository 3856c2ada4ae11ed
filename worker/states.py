"""The moves of enrollments and outbound messages: one table each, and the code that moves.

A lead's status moves one lead at a time (`leads.transition`, `leads.MOVES`). Enrollments
and outbox rows move in bulk (every enrollment of a lead, every queued send of a
campaign), so their moves are conditional UPDATEs: `enrollments(move, ...)` and
`outbox(move, ...)` build the UPDATE whose WHERE names the move's source states from the
table, and the caller adds its own conditions and columns. A row already loaded moves
with `move_enrollment` / `move_outbox`, checked against the same table without a query.
A move the table does not allow is a bug, not bad input: StateError.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, TypeVar

from sqlalchemy import ColumnElement, Update, literal, update

from worker.models import Enrollment, EnrollmentState, OutboundMessage, OutboxState

S = TypeVar("S", bound=StrEnum)


class StateError(Exception):
    """A state change the table of moves does not allow."""


@dataclass(frozen=True)
class Move(Generic[S]):
    """A kind of state change: the states it may start from and those it may lead to."""

    sources: frozenset[S]
    targets: frozenset[S]

    def target(self, name: str, to: S | None) -> S:
        """Where the move leads: `to`, or its only target when `to` is None."""
        if to is None and len(self.targets) == 1:
            (to,) = self.targets
        if to is None or to not in self.targets:
            raise StateError(f"{name}: cannot lead to {to} (only {sorted(self.targets)})")
        return to


_E = EnrollmentState
_LIVE = frozenset({_E.ACTIVE, _E.PAUSED})

ENROLLMENT_MOVES: dict[str, Move[EnrollmentState]] = {
    # An out-of-office reply: paused until the return date (a paused one gets the new date).
    "paused": Move(_LIVE, frozenset({_E.PAUSED})),
    # A colleague at the same company became a prospect: paused until a person acts.
    "paused_for_account": Move(frozenset({_E.ACTIVE}), frozenset({_E.PAUSED})),
    "resumed": Move(frozenset({_E.PAUSED}), frozenset({_E.ACTIVE})),
    "completed": Move(frozenset({_E.ACTIVE}), frozenset({_E.COMPLETED})),
    # The lead left status `lead`, was suppressed or unenrolled, or the campaign is gone.
    "stopped": Move(_LIVE, frozenset({_E.STOPPED})),
    # Enrolled again (`campaigns enroll`): it goes on from the step where it stopped.
    "continued": Move(frozenset({_E.STOPPED}), frozenset({_E.ACTIVE})),
    # An unsubscribe undone: back to the state it had before.
    "restored": Move(frozenset({_E.STOPPED}), _LIVE),
}
"""Every change of `enrollments.state` there is (a new enrollment starts `active`)."""

_O = OutboxState

OUTBOX_MOVES: dict[str, Move[OutboxState]] = {
    # Its SMTP transaction begins (worker.outbox: claimed once, by one worker).
    "claimed": Move(frozenset({_O.QUEUED}), frozenset({_O.SENDING})),
    # The server took it. A row found `unknown` meanwhile (its claim expired under a slow
    # server) is settled by what SMTP said.
    "sent": Move(frozenset({_O.SENDING, _O.UNKNOWN}), frozenset({_O.SENT})),
    # A temporary failure: tried again at `next_attempt_at` (also when the server refused
    # the envelope before the claim: the row is still `queued`).
    "deferred": Move(frozenset({_O.QUEUED, _O.SENDING, _O.UNKNOWN}), frozenset({_O.QUEUED})),
    # A permanent refusal, too many attempts, or a message that cannot be built.
    "failed": Move(frozenset({_O.QUEUED, _O.SENDING, _O.UNKNOWN}), frozenset({_O.FAILED})),
    # Found `sending` after a crash, and in the Sent folder.
    "confirmed": Move(frozenset({_O.SENDING}), frozenset({_O.SENT})),
    # It must not go out any more (the lead left, unsubscribed, was unenrolled, ...).
    "cancelled": Move(frozenset({_O.QUEUED}), frozenset({_O.CANCELLED})),
    # Found `sending` after a crash and not in the Sent folder: a person decides.
    "lost": Move(frozenset({_O.SENDING}), frozenset({_O.UNKNOWN})),
    # A person's decision on a lost one (`twoway outbox mark-sent | resend`).
    "marked_sent": Move(frozenset({_O.UNKNOWN}), frozenset({_O.SENT})),
    "resent": Move(frozenset({_O.UNKNOWN}), frozenset({_O.QUEUED})),
    # An unsubscribe undone: the sends it cancelled are queued again.
    "restored": Move(frozenset({_O.CANCELLED}), frozenset({_O.QUEUED})),
}
"""Every change of `outbound_messages.status` there is (a new row starts `queued`)."""


def enrollments(
    move: str, *where: ColumnElement[bool], to: EnrollmentState | None = None
) -> Update:
    """UPDATE enrollments SET state = the move's target WHERE state IN (its sources) AND
    `where`; the caller adds `.values(...)` for the other columns and executes it."""
    m = ENROLLMENT_MOVES[move]
    return (
        update(Enrollment)
        .where(Enrollment.state.in_([literal(x) for x in sorted(m.sources)]), *where)
        .values(state=m.target(move, to))
    )


def move_enrollment(en: Enrollment, move: str, to: EnrollmentState | None = None) -> None:
    """Move one loaded enrollment; StateError when its state is not one the move starts from."""
    m = ENROLLMENT_MOVES[move]
    if en.state not in m.sources:
        raise StateError(f"enrollment {en.id}: {move} cannot start from {en.state}")
    en.state = m.target(move, to)


def outbox(move: str, *where: ColumnElement[bool]) -> Update:
    """UPDATE outbound_messages SET status = the move's target WHERE status IN (its
    sources) AND `where`; the caller adds `.values(...)` and executes it."""
    m = OUTBOX_MOVES[move]
    return (
        update(OutboundMessage)
        .where(OutboundMessage.status.in_([literal(x) for x in sorted(m.sources)]), *where)
        .values(status=m.target(move, None))
    )


def move_outbox(row: OutboundMessage, move: str) -> None:
    """Move one loaded outbox row; StateError when its status is not one the move starts from."""
    m = OUTBOX_MOVES[move]
    if row.status not in m.sources:
        raise StateError(f"outbound message {row.id}: {move} cannot start from {row.status}")
    row.status = m.target(move, None)
