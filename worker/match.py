"""Matching an inbound message to the lead it concerns, strongest signal first.

1. a reply token in a recipient address (`sales+TOKEN@…`; for a bounce, VERP in the
   envelope recipient), or the unsubscribe address's token;
2. a Message-ID of ours in In-Reply-To or References (for a bounce: the returned
   message's Message-ID);
3. the sender's address (for a bounce: the failed recipient).

Mail from our own addresses and internal domains is never taken as a lead's reply.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from worker.classify import Classification
from worker.config import Config
from worker.models import Lead, OutboundMessage
from worker.parsing import ParsedMessage

_TOKEN = re.compile(r"^[a-z2-7]{16}$")


@dataclass(frozen=True)
class Match:
    """Which lead a message concerns and why. `method` is None when nothing matched."""

    lead_id: int | None
    method: str | None
    explanation: str
    outbound_id: int | None = None
    lead: Lead | None = field(default=None, compare=False, repr=False)
    """The loaded lead, kept so the caller's session does not load it again."""


NO_MATCH = Match(None, None, "no reply token, none of our Message-IDs, and an unknown sender")


def _tokens(addresses: tuple[str, ...], bases: frozenset[str]) -> list[str]:
    """Plus-address tokens of our sending addresses (`sales+TOKEN@…`) among `addresses`."""
    found = []
    for addr in addresses:
        local = addr.rsplit("@", 1)[0].lower()
        if "+" not in local:
            continue
        base, tag = local.split("+", 1)
        if base not in bases:
            continue
        tag = tag.removeprefix("unsubscribe-")
        if _TOKEN.match(tag):
            found.append(tag)
    return found


def is_internal(address: str | None, config: Config) -> bool:
    """Our own mailboxes, reps and internal domains."""
    if not address:
        return False
    address = address.lower()
    if address in config.our_addresses:
        return True
    return address.rsplit("@", 1)[-1] in config.our_domains


def match_message(
    session: Session, msg: ParsedMessage, cls: Classification, config: Config
) -> Match:
    """Find the lead `msg` concerns. Reads only; the caller records the result."""
    if cls.kind == "ours":
        return Match(None, None, "our own mail")
    bounce = cls.bounce if cls.kind == "bounce" else None
    if bounce is None and is_internal(msg.from_addr, config):
        return Match(None, None, f"sent by {msg.from_addr}, one of ours: never a lead's reply")

    tokens = ([cls.unsubscribe_token] if cls.unsubscribe_token else []) + _tokens(
        msg.all_recipients(), config.reply_bases
    )
    for token in tokens:
        lead = session.scalar(select(Lead).where(Lead.reply_token == token))
        if lead is not None:
            return _checked(
                Match(
                    lead.id, "reply_token", f"reply token {token} in a recipient address", lead=lead
                ),
                lead,
                msg,
                bounce is not None,
            )

    ids = list(bounce.original_message_ids) if bounce else []
    ids += list(msg.in_reply_to) + list(reversed(msg.references))
    if ids:
        ids = list(dict.fromkeys(ids))[:50]
        row = session.execute(
            select(OutboundMessage.id, OutboundMessage.lead_id, OutboundMessage.message_id)
            .where(OutboundMessage.message_id.in_(ids))
            .order_by(OutboundMessage.id.desc())
            .limit(1)
        ).first()
        if row is not None:
            lead = session.get(Lead, row.lead_id)
            if lead is not None:
                where = "the returned message" if bounce else "In-Reply-To/References"
                return _checked(
                    Match(
                        lead.id,
                        "message_id",
                        f"our Message-ID <{row.message_id}> in {where}",
                        row.id,
                        lead=lead,
                    ),
                    lead,
                    msg,
                    bounce is not None,
                )

    candidates = list(bounce.recipients) if bounce else [msg.from_addr, *msg.reply_to]
    for addr in candidates:
        if not addr:
            continue
        lead = session.scalar(select(Lead).where(Lead.email == addr.lower()))
        if lead is not None:
            what = "the failed recipient" if bounce else "the sender's address"
            return Match(lead.id, "sender", f"{what} {addr} is this lead's", lead=lead)
    return NO_MATCH


def _checked(m: Match, lead: Lead, msg: ParsedMessage, is_bounce: bool) -> Match:
    """Say so when someone other than the lead answered in the lead's thread."""
    if is_bounce or not msg.from_addr or msg.from_addr == lead.email:
        return m
    same_company = msg.from_addr.rsplit("@", 1)[-1] == lead.domain
    who = "a colleague at the same company" if same_company else "another address"
    return Match(
        m.lead_id,
        m.method,
        f"{m.explanation}; written by {who} ({msg.from_addr})",
        m.outbound_id,
        lead=m.lead,
    )
