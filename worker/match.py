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
from typing import Any

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


@dataclass
class Known:
    """What a batch of messages can match, read with one query per signal (`prefetch`).

    A hit is what the single query would have found: reply tokens and addresses belong
    to one lead for good, and no mail already received can name one of our Message-IDs
    made after the lookup. A miss is final too, unless a lead was made in the same unit
    of work since (a referral, an unknown sender: `note_new_lead`); then it is looked up
    singly. (A lead another process commits meanwhile is not seen, as it would not be a
    moment earlier.) Holds the leads, so the session keeps them loaded for the unit of
    work.
    """

    by_token: dict[str, Lead] = field(default_factory=dict)
    by_email: dict[str, Lead] = field(default_factory=dict)
    by_message_id: dict[str, tuple[int, int, str]] = field(default_factory=dict)
    """Our Message-ID -> (outbound id, lead id, Message-ID)."""
    leads: dict[int, Lead] = field(default_factory=dict)
    message_ids_checked: set[str] = field(default_factory=set)
    """Every Message-ID looked up in the outbox: the signals' and the messages' own (a
    reply-ready copy goes out under the prospect's Message-ID, unless a row has it)."""
    tokens_checked: set[str] = field(default_factory=set)
    emails_checked: set[str] = field(default_factory=set)
    new_leads: int = 0
    """Leads made one by one in the unit of work when it looked (`note_new_lead`)."""

    def settled(self, session: Session, checked: set[str], value: str) -> bool:
        """Whether a miss for `value` is final: it was looked up, and no lead has been
        made since (only a new lead can own a token or address that had none)."""
        return value in checked and session.info.get(_NEW_LEADS, 0) == self.new_leads


_NEW_LEADS = "twoway.new_leads"


def note_new_lead(session: Session) -> None:
    """Count a lead made in this unit of work (a referral, an unknown sender): the batch's
    lookups (`Known`) no longer settle its misses."""
    session.info[_NEW_LEADS] = session.info.get(_NEW_LEADS, 0) + 1


_CHUNK = 500  # values per IN list: far below any database's bound-parameter limit


def _signals(
    msg: ParsedMessage, cls: Classification, config: Config
) -> tuple[list[str], list[str], list[str]] | None:
    """The reply tokens, Message-IDs and addresses `match_message` tries, in its order;
    None when it matches nothing by design (our own mail)."""
    if cls.kind == "ours":
        return None
    bounce = cls.bounce if cls.kind == "bounce" else None
    if bounce is None and is_internal(msg.from_addr, config):
        return None
    tokens = ([cls.unsubscribe_token] if cls.unsubscribe_token else []) + _tokens(
        msg.all_recipients(), config.reply_bases
    )
    ids = list(bounce.original_message_ids) if bounce else []
    ids += list(msg.in_reply_to) + list(reversed(msg.references))
    ids = list(dict.fromkeys(ids))[:50]
    candidates = list(bounce.recipients) if bounce else [msg.from_addr, *msg.reply_to]
    return tokens, ids, [a.lower() for a in candidates if a]


def prefetch(
    session: Session, items: list[tuple[ParsedMessage, Classification]], config: Config
) -> Known:
    """Look up every signal of a batch of messages at once (see `Known`)."""
    tokens: set[str] = set()
    ids: set[str] = set()
    addresses: set[str] = set()
    for msg, cls in items:
        found = _signals(msg, cls, config)
        if found is not None:
            tokens.update(found[0])
            ids.update(found[1])
            addresses.update(found[2])
    ids.update(
        m for msg, _ in items if msg.message_id and (m := msg.message_id.strip().strip("<>"))
    )
    known = Known(
        message_ids_checked=ids,
        tokens_checked=tokens,
        emails_checked=addresses,
        new_leads=session.info.get(_NEW_LEADS, 0),
    )
    for chunk in _chunks(tokens):
        for lead in session.scalars(select(Lead).where(Lead.reply_token.in_(chunk))):
            known.by_token[lead.reply_token] = known.leads[lead.id] = lead
    for chunk in _chunks(ids):
        for row in session.execute(
            select(OutboundMessage.id, OutboundMessage.lead_id, OutboundMessage.message_id).where(
                OutboundMessage.message_id.in_(chunk)
            )
        ):
            known.by_message_id[row.message_id] = (row.id, row.lead_id, row.message_id)
    for chunk in _chunks(addresses):
        for lead in session.scalars(select(Lead).where(Lead.email.in_(chunk))):
            known.by_email[lead.email] = known.leads[lead.id] = lead
    missing = {lead_id for _, lead_id, _ in known.by_message_id.values()} - known.leads.keys()
    for chunk in _chunks(missing):
        for lead in session.scalars(select(Lead).where(Lead.id.in_(chunk))):
            known.leads[lead.id] = lead
    return known


def _chunks(values: set[str] | set[int]) -> list[list[Any]]:
    ordered = sorted(values)
    return [ordered[i : i + _CHUNK] for i in range(0, len(ordered), _CHUNK)]


def match_message(
    session: Session,
    msg: ParsedMessage,
    cls: Classification,
    config: Config,
    known: Known | None = None,
) -> Match:
    """Find the lead `msg` concerns. Reads only; the caller records the result.
    `known`: the batch's signals looked up at once (`prefetch`); misses are queried."""
    if cls.kind == "ours":
        return Match(None, None, "our own mail")
    bounce = cls.bounce if cls.kind == "bounce" else None
    if bounce is None and is_internal(msg.from_addr, config):
        return Match(None, None, f"sent by {msg.from_addr}, one of ours: never a lead's reply")

    tokens = ([cls.unsubscribe_token] if cls.unsubscribe_token else []) + _tokens(
        msg.all_recipients(), config.reply_bases
    )
    for token in tokens:
        lead = known.by_token.get(token) if known is not None else None
        if lead is None and not (known and known.settled(session, known.tokens_checked, token)):
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
        hits = [known.by_message_id[i] for i in ids if i in known.by_message_id] if known else []
        row: Any = max(hits) if hits else None  # the latest of our emails it names
        # Nothing received can name an email of ours made after the batch looked.
        if row is None and not (known and known.message_ids_checked.issuperset(ids)):
            row = session.execute(
                select(OutboundMessage.id, OutboundMessage.lead_id, OutboundMessage.message_id)
                .where(OutboundMessage.message_id.in_(ids))
                .order_by(OutboundMessage.id.desc())
                .limit(1)
            ).first()
        if row is not None:
            row_id, row_lead_id, row_message_id = row
            lead = known.leads.get(row_lead_id) if known is not None else None
            lead = lead if lead is not None else session.get(Lead, row_lead_id)
            if lead is not None:
                where = "the returned message" if bounce else "In-Reply-To/References"
                return _checked(
                    Match(
                        lead.id,
                        "message_id",
                        f"our Message-ID <{row_message_id}> in {where}",
                        row_id,
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
        email = addr.lower()
        lead = known.by_email.get(email) if known is not None else None
        if lead is None and not (known and known.settled(session, known.emails_checked, email)):
            lead = session.scalar(select(Lead).where(Lead.email == email))
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
