"""What the templates of each kind of email see: one typed builder per kind.

The outbox builds the context of every message it sends with these; `templates lint`,
`templates preview` and `config check` build theirs with the same functions from sample
data (or a real lead), so a template that passes lint renders when it is sent.

Nurture steps see `lead`, `sender`, `unsubscribe_url`, `campaign` and `step`. A handoff
and a follow-up see `lead`, `sender` and `unsubscribe_url` too, plus the facts recorded
when the reply was applied (stored in the outbox row, as JSON): HandoffFacts and
FollowupFacts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal, NotRequired, TypedDict

from worker.compose import unsubscribe_targets
from worker.config import Campaign, Config, SenderConfig

Kind = Literal["nurture", "handoff", "followup", "rep_copy", "reminder", "escalation"]
KINDS: tuple[Kind, ...] = ("nurture", "handoff", "followup", "rep_copy", "reminder", "escalation")


class LeadBlock(TypedDict):
    email: str
    first_name: str
    last_name: str
    company: str
    title: str
    industry: str
    company_size: int | None
    annual_revenue: int | None
    country: str
    timezone: str
    source: str
    custom: dict[str, Any]


class SenderBlock(TypedDict):
    name: str
    address: str
    postal_address: str


class RepBlock(TypedDict):
    name: str
    email: str
    first_name: str


ReplyBlock = TypedDict("ReplyBlock", {"subject": str, "from": str, "date": str, "text": str})


class ThreadItem(TypedDict):
    direction: Literal["in", "out"]
    at: str
    subject: str
    summary: str
    text: NotRequired[str]
    """An earlier reply's own text (empty for our emails and the current message)."""


class Colleague(TypedDict):
    name: str
    email: str
    title: str


class MatchBlock(TypedDict):
    method: str | None
    explanation: str


class Common(TypedDict):
    """What every kind of email sees."""

    lead: LeadBlock
    sender: SenderBlock
    unsubscribe_url: str


class CampaignBlock(TypedDict):
    name: str


class StepBlock(TypedDict):
    number: int
    total: int


class NurtureContext(Common):
    campaign: CampaignBlock
    step: StepBlock


class HandoffFacts(TypedDict):
    """The handoff's part of its context, fixed when the reply is applied."""

    rep: RepBlock
    prospect: dict[str, Any]
    qualification: dict[str, Any]
    match: MatchBlock
    reply: ReplyBlock
    reply_text: str
    thread: list[ThreadItem]
    assignment_reason: str
    again: bool
    colleagues: NotRequired[list[Colleague]]
    """Colleagues whose nurture this prospect paused (they go to the same rep)."""
    followup: NotRequired[dict[str, Any] | None]
    """The follow-up in the rep's name: `due`, `due_local`, `immediate`, `key`; the outbox
    adds its `text` and `sent` when the briefing is built."""


class OriginalFacts(TypedDict):
    """Whether the prospect's original message goes with the briefing, and if not why:
    set by the outbox when it builds the briefing (see `original_facts`)."""

    original_attached: bool
    original_size_mb: float | None
    """Its size as received, in MB (one decimal); None when twoway did not keep it."""
    original_limit_mb: float
    """Originals larger than this are not attached (mail servers refuse big messages)."""


class HandoffContext(Common, HandoffFacts, OriginalFacts):
    pass


SAMPLE_ORIGINAL: OriginalFacts = {
    "original_attached": True,
    "original_size_mb": 0.1,
    "original_limit_mb": 10.0,
}


def original_facts(raw: bytes | None, limit: int) -> OriginalFacts:
    """What the briefing says of the original: attached when twoway kept its bytes and
    they are at most `limit` bytes."""
    mb = 1024 * 1024
    return {
        "original_attached": raw is not None and 0 < len(raw) <= limit,
        "original_size_mb": round(len(raw) / mb, 1) if raw else None,
        "original_limit_mb": round(limit / mb, 1),
    }


class FollowupReply(TypedDict):
    subject: str | None
    text: str
    asks: NotRequired[list[str]]
    """What the reply asks for: pricing, demo, referral, question (worker.handoffs)."""
    referral: NotRequired[str]


class FollowupFacts(TypedDict):
    """The follow-up's part of its context, fixed when the reply is applied."""

    rep: RepBlock
    reply: FollowupReply
    references: list[str]
    subject_override: str
    from_addr: str
    from_name: str


class FollowupContext(Common, FollowupFacts):
    pass


class RepCopyReply(TypedDict):
    subject: str
    from_name: str
    date: str
    full_text: str


class RepCopyFacts(TypedDict):
    """The reply-ready copy of the prospect's message: only what she wrote."""

    reply: RepCopyReply
    header_message_id: str
    references: list[str]
    reply_in_reply_to: str | None


class RepCopyContext(TypedDict):
    """Deliberately not Common: no lead fields (custom CSV columns may be internal) and no
    unsubscribe link; nothing but her message and our sender can reach her through it."""

    reply: RepCopyReply
    sender: SenderBlock


class NudgeFacts(TypedDict):
    """A reminder to the rep, or an escalation (to a manager, or telling the first rep the
    prospect went to `new_rep`)."""

    prospect: LeadBlock
    rep: dict[str, str]
    handed_at: str | None
    waited: str
    sla: str
    new_rep: NotRequired[dict[str, str]]


class NudgeContext(Common, NudgeFacts):
    pass


Context = NurtureContext | HandoffContext | FollowupContext | RepCopyContext | NudgeContext


def common(lead: LeadBlock, sender: SenderBlock, unsubscribe_url: str) -> Common:
    return {"lead": lead, "sender": sender, "unsubscribe_url": unsubscribe_url}


def nurture_context(base: Common, campaign: str, step: int, total: int) -> NurtureContext:
    """`step` counts from 1."""
    return {
        **base,
        "campaign": {"name": campaign},
        "step": {"number": max(1, min(step, total)), "total": total},
    }


def handoff_context(base: Common, facts: Mapping[str, Any]) -> HandoffContext:
    """`facts`: a HandoffFacts as stored in the outbox row (JSON, read back)."""
    return {**facts, **base}  # type: ignore[typeddict-item]  # JSON read back from the row


def followup_context(base: Common, facts: Mapping[str, Any]) -> FollowupContext:
    """`facts`: a FollowupFacts as stored in the outbox row (JSON, read back)."""
    return {**facts, **base}  # type: ignore[typeddict-item]  # JSON read back from the row


def context_for(
    kind: str,
    base: Common,
    facts: Mapping[str, Any],
    *,
    campaign: str | None = None,
    step: int = 1,
    total: int = 1,
) -> Context:
    """The context of one email of `kind` (the outbox row's `kind`)."""
    if kind == "handoff":
        return handoff_context(base, facts)
    if kind == "followup":
        return followup_context(base, facts)
    if kind == "rep_copy":
        return rep_copy_context(base, facts)
    if kind in ("reminder", "escalation"):
        return {**facts, **base}  # type: ignore[return-value]  # JSON read back
    return nurture_context(base, campaign or "", step, total)


def rep_copy_context(base: Common, facts: Mapping[str, Any]) -> RepCopyContext:
    """`facts`: a RepCopyFacts as stored in the outbox row (JSON, read back)."""
    return {"reply": facts["reply"], "sender": base["sender"]}


def sender_block(name: str | None, address: str, postal_address: str) -> SenderBlock:
    return {"name": name or address, "address": address, "postal_address": postal_address}


def unsubscribe_url(sender: SenderConfig, token: str) -> str:
    """What `unsubscribe_url` is for the lead with reply token `token`: the one-click URL,
    else the mailto address, else empty (the layout then says to reply "unsubscribe")."""
    url, mailto = unsubscribe_targets(sender, token)
    return url or (f"mailto:{mailto}" if mailto else "")


def kinds_of(config: Config, names: Iterable[str]) -> dict[str, Kind]:
    """Which kind of email each template is: what the config sends it as; a template the
    config does not name yet goes by its folder (`handoff/…`, `followup/…`), else nurture."""
    kinds: dict[str, Kind] = {}
    for name in names:
        top = name.split("/", 1)[0]
        kinds[name] = top if top in ("handoff", "followup") else "nurture"  # type: ignore[assignment]
    for c in config.campaigns:
        for step in c.steps:
            kinds.update(dict.fromkeys(step.templates, "nurture"))
    kinds[config.handoff.template] = "handoff"
    kinds[config.handoff.reply_template] = "rep_copy"
    kinds[config.handoff.reminder_template] = "reminder"
    kinds[config.handoff.escalation_template] = "escalation"
    if config.handoff.follow_up is not None:
        kinds[config.handoff.follow_up.template] = "followup"
    return kinds


def rep_block(name: str, email: str) -> RepBlock:
    return {"name": name, "email": email, "first_name": name.split()[0] if name.split() else ""}


# --- sample data, for lint and preview ---------------------------------------------------


class _AnyCustom(dict[str, Any]):
    """A sample lead's custom fields: any column a template names exists (lint cannot know
    which CSV columns leads will have; `templates lint --leads` checks the real ones)."""

    def __missing__(self, key: str) -> str:
        return f"[{key}]"


SAMPLE_LEAD: LeadBlock = {
    "email": "maya.patel@northwind-logistics.example",
    "first_name": "Maya",
    "last_name": "Patel",
    "company": "Northwind Logistics",
    "title": "Head of Operations",
    "industry": "logistics",
    "company_size": 240,
    "annual_revenue": 38_000_000,
    "country": "GB",
    "timezone": "Europe/London",
    "source": "webinar: Shipping without spreadsheets",
    "custom": {"webinar_date": "3 November"},
}
SAMPLE_SENDER: SenderBlock = {
    "name": "Acme Sales",
    "address": "sales@acme.example",
    "postal_address": "Acme Inc., 1 Main Street, Springfield, IL 62701, USA",
}
SAMPLE_UNSUBSCRIBE = "https://acme.example/unsubscribe/k3x9q2m7"


def sample_lead(lead: Mapping[str, Any] | None = None) -> LeadBlock:
    """The sample lead, or `lead` (a real one's fields) over it."""
    out: dict[str, Any] = {**SAMPLE_LEAD, "custom": _AnyCustom(SAMPLE_LEAD["custom"])}
    if lead is not None:
        out.update({k: v for k, v in lead.items() if v is not None})
        out["custom"] = dict(lead.get("custom") or {})
    return out  # type: ignore[return-value]  # the keys of SAMPLE_LEAD, typed there


def sample_handoff_facts(lead: LeadBlock) -> HandoffFacts:
    rep = rep_block("Ben Okafor", "ben.okafor@acme.example")
    reply: ReplyBlock = {
        "subject": "Re: How Brightline cut dispatch time by 40%",
        "from": " ".join(x for x in (lead["first_name"], lead["last_name"]) if x)
        + f" <{lead['email']}>",
        "date": "Tue, 1 Dec 2026 10:42:00 +0000",
        "text": (
            "Hi Ben,\n\nThe Brightline story sounds a lot like us. We run about 60 trucks and "
            "still plan routes in spreadsheets.\nCould you send pricing for a team of 12 "
            "planners, and would a demo next week work?\n\nThanks,\nMaya"
        ),
    }
    met = [
        ("Industry is in the target market", "met", "logistics"),
        ("Company size at least 20", "met", "240 employees"),
        ("Annual revenue at least 1,000,000", "met", "38,000,000"),
        ("Decision-making title", "met", "Head of Operations"),
        ("Buying intent in the reply", "met", "pricing, demo"),
        ("Budget confirmed", "unknown", ""),
    ]
    return {
        "rep": rep,
        "prospect": {**lead, "status": "prospect", "owner": rep["email"]},
        "qualification": {
            "score": 80,
            "checklist": [{"criterion": c, "status": st, "evidence": ev} for c, st, ev in met],
        },
        "match": {
            "method": "reply_token",
            "explanation": (
                "Sent to the reply address of our step 2 email (sales+k3x9q2m7@acme.example) "
                "by a person, not an auto-responder; it quotes our message and adds new text."
            ),
        },
        "reply": reply,
        "reply_text": reply["text"],
        "thread": [
            {
                "direction": "out",
                "at": "2026-11-24 09:05 UTC",
                "subject": "Welcome to Acme, Maya",
                "summary": "Step 1 of 3: welcome",
            },
            {
                "direction": "out",
                "at": "2026-11-27 09:12 UTC",
                "subject": "How Brightline cut dispatch time by 40%",
                "summary": "Step 2 of 3: case study",
            },
            {
                "direction": "in",
                "at": "2026-12-01 10:42 UTC",
                "subject": reply["subject"],
                "summary": "this message",
                "text": "",
            },
        ],
        "assignment_reason": "Industry rule: logistics goes to Ben Okafor",
        "again": False,
        "colleagues": [
            {
                "name": "Tom Reed",
                "email": "tom.reed@northwind-logistics.example",
                "title": "Fleet Manager",
            }
        ],
        "followup": {
            "due": "2026-12-01T11:42:00+00:00",
            "due_local": "11:42 on Tue 01 Dec (Europe/London)",
            "immediate": False,
            "sent": False,
            "text": "Hi Maya,\n\nThank you for your reply. I will send you pricing ...",
        },
    }


def sample_rep_copy_facts(lead: LeadBlock) -> RepCopyFacts:
    text = sample_handoff_facts(lead)["reply"]["text"]
    return {
        "reply": {
            "subject": "Re: How Brightline cut dispatch time by 40%",
            "from_name": " ".join(x for x in (lead["first_name"], lead["last_name"]) if x),
            "date": "Tue, 1 Dec 2026 10:42:00 +0000",
            "full_text": f"{text}\n\nOn Fri, 27 Nov 2026 at 09:12, Acme Sales wrote:\n"
            "> Hi Maya, here is how Brightline cut dispatch time by 40%...",
        },
        "header_message_id": "reply.maya@northwind.example",
        "references": ["step2.k3x9q2m7@acme.example"],
        "reply_in_reply_to": "step2.k3x9q2m7@acme.example",
    }


def sample_nudge_facts(lead: LeadBlock) -> NudgeFacts:
    return {
        "prospect": lead,
        "rep": {"name": "Ben Okafor", "email": "ben.okafor@acme.example"},
        "handed_at": "2026-12-01T10:42:00Z",
        "waited": "2 h 05 min",
        "sla": "2bh",
        "new_rep": {"name": "Chloe Martin", "email": "chloe.martin@acme.example"},
    }


def samples(
    sender: SenderConfig | None = None,
    lead: Mapping[str, Any] | None = None,
    campaign: Campaign | None = None,
    step: int = 1,
    unsubscribe: str | None = None,
) -> dict[Kind, Context]:
    """The context of each kind, built by the builders the outbox uses, from sample data.

    `sender` fills the sender block from the config; `lead` (a real lead's fields)
    replaces the sample lead, custom fields included; `unsubscribe`, that lead's real
    unsubscribe URL; `campaign` names the campaign and its length.
    """
    block = SAMPLE_SENDER
    if sender is not None:
        block = sender_block(sender.display_name, sender.address, sender.postal_address)
    who = sample_lead(lead)
    base = common(who, block, SAMPLE_UNSUBSCRIBE if unsubscribe is None else unsubscribe)
    total = len(campaign.steps) if campaign is not None else 3
    return {
        "nurture": nurture_context(base, campaign.name if campaign else "welcome", step, total),
        "handoff": handoff_context(base, {**sample_handoff_facts(who), **SAMPLE_ORIGINAL}),
        "followup": followup_context(base, sample_followup_facts()),
        "rep_copy": rep_copy_context(base, sample_rep_copy_facts(who)),
        "reminder": {**base, **sample_nudge_facts(who)},
        "escalation": {**base, **sample_nudge_facts(who)},
    }


def preview_context(
    config: Config, name: str, lead: LeadBlock | None = None, token: str | None = None
) -> Context:
    """What template `name` sees in a preview (`templates preview`, the console): the
    sample context of the kind the config sends it as; with `lead` (a lead's fields)
    and `token` (its reply token), that lead's data and its own unsubscribe link."""
    unsubscribe = unsubscribe_url(config.sender, token) if token else None
    return samples(config.sender, lead, unsubscribe=unsubscribe)[kinds_of(config, [name])[name]]


def sample_followup_facts() -> FollowupFacts:
    rep = rep_block("Ben Okafor", "ben.okafor@acme.example")
    return {
        "rep": rep,
        "reply": {
            "subject": "Re: How Brightline cut dispatch time by 40%",
            "text": "Pricing?",
            "asks": ["pricing", "demo"],
            "referral": "",
        },
        "references": ["<step2.k3x9q2m7@acme.example>", "<reply.maya@northwind.example>"],
        "subject_override": "Re: How Brightline cut dispatch time by 40%",
        "from_addr": rep["email"],
        "from_name": rep["name"],
    }
