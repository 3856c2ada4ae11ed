"""Delivery reports: is this message a bounce, which recipients failed, hard or soft.

Standard reports (RFC 3464 `message/delivery-status`) are read field by field. Everything
else (qmail, old Exchange, Yahoo, GroupWise, postmaster notices in plain words) is read
from the human-readable text: the part before the copy of the returned message, where
the failed addresses and the reason are written.

Hard means the address is permanently undeliverable (unknown user or host, moved,
disabled, not accepting mail). Everything else is soft, including 5.7.x policy and
spam blocks (usually about *our* reputation, not a dead lead) and full mailboxes.
Pure functions; nothing here raises.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from worker.caseless import Caseless
from worker.parsing import DeliveryStatus, ParsedMessage

__all__ = [
    "HARD_REASONS",
    "BounceReport",
    "Reason",
    "analyse_bounce",
    "bounce_reason",
    "hard_or_soft",
    "provider_notification",
]

Outcome = Literal["failed", "delayed", "delivered"]

# Each starts only where a local part can start (the lookbehinds), so a long run of
# address characters without an "@" costs one pass, not one per position.
_ADDR_RE = re.compile(
    r"(?<![\w.!#$%&'*+/=?^`{|}~-])[\w.!#$%&'*+/=?^`{|}~-]+@(?:[\w-]+\.)+[A-Za-z]{2,}|"
    r"(?<![\w.+-])[\w.+-]+@\[[\d.]+\]"
)
_STATUS_RE = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
# An SMTP reply code where MTAs write one: at the start of a line or after "said:".
_SMTP_CODE_RE = Caseless(
    r"(?:^|said:|response:|error:|\)\s*+:|\]:)\s*+([45]\d\d)(?:[ -]|$)", re.MULTILINE
)
_THREE_DIGITS_RE = re.compile(r"[45]\d\d")  # in every match of the above

_DAEMON_RE = re.compile(
    r"(?i)^\"?(?:mailer[-_.]?daemon|post[-_.]?master|mdaemon|mail[-_.]?delivery[-_.]?system|"
    r"mail[-_.]?delivery[-_.]?subsystem|mailadm|mail[-_.]?admin|smtp[-_.]?gateway|"
    r"[\w.-]*smtp[-_.]?mail[-_.]?service|[\w.-]*antivirus[\w.-]*|imss|inetgw\d*|"
    r"system[-_.]?administrator|\"system administrator\"|noreply-dmarc|bounces?|"
    r"microsoftexchange\w*|mailer)(?:@|\\@)"
)
_BOUNCE_SUBJECT_RE = Caseless(
    r"undeliver|undelivered|delivery\s+(?:status\s+notification|failure|failed|has\s+failed|"
    r"problem|report|notification)|returned\s+mail|failure\s+notice|mail\s+delivery\s+(?:failed|failure)|"
    r"non[- ]?delivery|could\s+not\s+be\s+delivered|not\s+delivered|delivery\s+failure|"
    r"permanent\s+delivery|mail\s+system\s+error|mail\s+error|nameserver\s+error|failed\s+mail|"
    r"processing\s+error|failure\s+delivery|mail\s+failure|user\s+unknown|mail\s+failed|"
    r"nicht\s+zustellbar|unzustellbar|non\s+remis|non\s+distribuable|no\s+entregado|"
    r"non\s+recapitato|não\s+entregue|onbestelbaar|warning:.*delayed|delivery\s+warning|"
    r"delayed\s+mail|message\s+delayed|not\s+yet\s+been\s+delivered|non\s+recensé|失败|退信"
)
_FAILURE_BODY_RE = Caseless(
    r"could\s+not\s+be\s+delivered|couldn't\s+be\s+delivered|wasn't\s+able\s+to\s+deliver|"
    r"unable\s+to\s+deliver|undeliverable|permanent(?:ly)?\s+(?:fatal\s+)?(?:error|failure|failed)|"
    r"delivery\s+(?:to\s+the\s+following\s+recipients?\s+)?failed|delivery\s+has\s+failed|"
    r"user\s+unknown|unknown\s+user|no\s+such\s+(?:user|mailbox|address)|does\s+not\s+exist|"
    r"was\s+not\s+delivered|not\s+delivered\s+to|message\s+(?:could\s+not|cannot)\s+be\s+delivered|"
    r"cannot\s+be\s+delivered|recipient\s+address\s+rejected|mailbox\s+(?:unavailable|full)|"
    r"returned\s+to\s+sender|failed\s+recipient|delivery\s+failure|addressee\s+unknown|"
    r"host\s+unknown|unknown\s+host|not\s+listed\s+in|account\s+(?:has\s+been\s+)?disabled|"
    r"did\s+not\s+reach|failed\s+addresses|no\s+valid\s+recipients|did\s+not\s+(?:exactly\s+)?match|"
    r"失败|退信|无法投递|未能送达|"
    r"nicht\s+zugestellt|konnte\s+nicht\s+zugestellt|n'a\s+pas\s+pu\s+(?:ê|e)tre\s+d(?:é|e)livr|"
    r"no\s+se\s+ha\s+podido\s+entregar|non\s+è\s+stato\s+possibile\s+recapitare"
)
_DELAY_RE = Caseless(
    r"\bdelayed\b|\bdelay\b|not\s+yet\s+been\s+delivered|will\s+(?:continue|keep)\s+(?:to\s+)?"
    r"(?:try|retry|trying|retrying|attempt)|still\s+being\s+retried|attempts\s+will\s+continue|"
    r"warning\s+message\s+only|do\s+not\s+(?:need\s+to\s+)?resend|no\s+action\s+is\s+required|"
    r"delivery\s+warning|will\s+be\s+retried|temporarily\s+deferred"
)
_STRONG_DELAY_RE = Caseless(
    r"will\s+(?:continue|keep)\s+(?:to\s+)?(?:try|retry)|attempts\s+will\s+continue|"
    r"still\s+being\s+retried|not\s+yet\s+been\s+delivered|warning\s+message\s+only|"
    r"advisory|has\s+been\s+postponed|will\s+be\s+retried"
)
# Where the copy of the returned message starts in a plain-text bounce.
_RETURNED_MARKER_RE = Caseless(
    # Possessive prefixes: a long run of dashes is read once (no cubic backtracking).
    r"^[\s>]*+(?:-++\s*+)?(?:below\s+this\s+line\s+is\s+a\s+copy|this\s+is\s+a\s+copy\s+of\s+"
    r"the\s+message|original\s+message\s+follows|the\s+original\s+message\s+follows|"
    r"original\s+message|returned\s+message|unsent\s+message\s+below|"
    r"the\s+header\s+of\s+the\s+original|returned\s+mail\s+follows|"
    r"transcript\s+of\s+session\s+follows|message\s+text\s+follows|"
    r"message\s+header\s+follows|original\s+text\s+follows|"
    r"undelivered\s+message|this\s+is\s+a\s+copy)",
    re.MULTILINE,
)
_RETURNED_HEADERS_RE = Caseless(
    r"^(?:received|return-path|message-id|x-[\w-]+|mime-version):[^\n]*\n(?:[ \t][^\n]*\n)*"
    r"(?:received|return-path|message-id|from|date|subject|to|x-[\w-]+|mime-version|"
    r"content-type):",
    re.MULTILINE,
)

_HARD_TEXT_RE = Caseless(
    r"user\s+unknown|unknown\s+user|no\s+such\s+(?:user|mailbox|recipient|address|"
    r"account|person)|does\s+not\s+exist|doesn't\s+exist|(?:recipient|address|mailbox|user)\s+"
    r"(?:is\s+)?(?:unknown|not\s+found|invalid|unavailable)|invalid\s+(?:recipient|mailbox|"
    r"address|user)|unknown\s+(?:recipient|mailbox|address|local[- ]part)|addressee\s+unknown|"
    r"not\s+(?:a\s+)?(?:valid|known)\s+(?:user|mailbox|recipient|address)|"
    r"host\s+(?:unknown|not\s+found)|unknown\s+host|domain\s+(?:not\s+found|does\s+not\s+exist)|"
    r"no\s+mx\b|name\s*server\s+error|unrouteable\s+address|unroutable|"
    r"account\s+(?:has\s+been\s+)?(?:disabled|discontinued|closed|deleted|expired|terminated|"
    r"suspended|inactive)|mailbox\s+(?:disabled|closed|deleted|inactive)|"
    r"no\s+mailbox\s+here|no\s+longer\s+(?:valid|active|exists|works|employed|with)|has\s+moved|"
    r"not\s+listed\s+in|is\s+not\s+accepting\s+mail|does\s+not\s+accept\s+mail|"
    r"not\s+recognized|recipient\s+rejected|did\s+not\s+(?:exactly\s+)?match|unbekannt|existiert\s+nicht|inconnu|"
    r"n'existe\s+pas|non\s+recensé|desconocido|no\s+existe|sconosciuto|inesistente"
)
_SOFT_TEXT_RE = Caseless(
    r"mailbox\s+(?:is\s+)?full|over\s*quota|quota\s+exceeded|exceed(?:s|ed)?\s+(?:the\s+)?"
    r"(?:storage|quota|maximum)|insufficient\s+(?:storage|system\s+storage)|too\s+large|"
    r"message\s+size|spam|blocked|blacklist|block\s*list|denylist|policy|reputation|"
    r"\bspf\b|\bdkim\b|\bdmarc\b|rate\s+limit|too\s+many|try\s+again\s+later|timed?\s*out|"
    r"temporar|relay(?:ing)?\s+(?:access\s+)?denied|unable\s+to\s+relay|virus|"
    r"content\s+rejected|greylist|hops|loop"
)


@dataclass(frozen=True)
class BounceReport:
    """What a delivery report says.

    `outcome` is "failed" for a bounce, "delayed" for a warning that delivery is still
    being tried, "delivered" for a success notice (delivered/relayed/expanded).
    `recipients` are the affected addresses, lower-cased; `status` the first RFC 3463
    code found (e.g. "5.1.1"); `kind` is "hard" or "soft" (meaningful for "failed");
    `original_message_ids` the Message-IDs of the returned message, without <>;
    `reason` the signal that made it a report; `cause` the bounce taxonomy's reason.
    """

    outcome: Outcome
    kind: Literal["hard", "soft"]
    recipients: tuple[str, ...]
    status: str | None
    diagnostic: str | None
    original_message_ids: tuple[str, ...]
    reason: str
    cause: Reason = "other"


# ----------------------------------------------------------------------------- reasons

Reason = Literal[
    "user_unknown",
    "host_unknown",
    "mailbox_full",
    "message_too_big",
    "rate_limited",
    "blocked",
    "spam_policy",
    "sender_rejected",
    "relay_denied",
    "expired",
    "suspended",
    "system_error",
    "other",
]
# The two reasons that say the address is dead. Every other named reason is soft: a
# problem of our own sender or reputation, of size or load, or a temporary one. An
# unnamed ("other") permanent failure is hard (see bounce_reason).
HARD_REASONS: frozenset[str] = frozenset({"user_unknown", "host_unknown"})

# Diagnostic wording, most specific first. Each names the signal and where it is used:
# RFC 3463 texts, Postfix/Exim/Sendmail/qmail/Exchange/Gmail/Yahoo/Domino messages.
_REASON_TEXT: tuple[tuple[Reason, Caseless], ...] = (
    # Our sender address or domain (Postfix "Sender address rejected", Exim "unrouteable
    # sender address", Sendmail "Domain of sender address ... does not exist", 5.1.7/5.1.8).
    (
        "sender_rejected",
        Caseless(
            r"sender\s+address\s+(?:rejected|invalid|not\s+(?:allowed|valid|accepted))|"
            r"domain\s+of\s+sender\s+address|unrout(?:e)?able\s+sender|sender\s+verif\w*\s+failed|"
            r"sender\s+(?:domain|address)\s+(?:must\s+exist|does\s+not\s+exist|unknown|not\s+found)|"
            r"(?:bad|invalid|unknown)\s+sender|sender\s+(?:is\s+)?(?:rejected|not\s+authori[sz]ed)|"
            r"return\s+path\s+(?:invalid|rejected)|mail\s+from\s+(?:rejected|refused)"
        ),
    ),
    # Over quota (RFC 3463 X.2.2 "mailbox full"), even under a wrong 5.1.1 or 5.0.0.
    (
        "mailbox_full",
        Caseless(
            r"mail\s*box\s+(?:is\s+|was\s+)?(?:full|over\s*quota)|over\s*quota|quota\s+exceeded|"
            r"exceed(?:s|ed|ing)?\s+(?:the\s+|his\s+|her\s+|their\s+|its\s+)?(?:storage|quota|"
            r"mailbox\s+size)|(?:disk|storage|mailbox)\s+quota|insufficient\s+(?:system\s+)?storage|"
            r"mailbox\s+size\s+limit|out\s+of\s+storage|storage\s+(?:space\s+)?(?:full|exceeded)|"
            r"user\s+has\s+(?:exceeded|too\s+many\s+messages)|mail\s*box\s+space\s+not\s+enough|"
            r"(?:mail\s*folder|inbox)\s+is\s+full|quota\s+violation|"
            r"postfach\s+(?:ist\s+)?voll|"
            r"boîte\s+(?:aux\s+lettres\s+)?pleine|buzón\s+lleno|casella\s+piena"
        ),
    ),
    # X.3.4 "message too big for system", X.2.3 "message length exceeds administrative limit".
    (
        "message_too_big",
        Caseless(
            r"message\s+(?:is\s+)?too\s+(?:large|big)|message\s+size\s+(?:exceeds|limit|too)|"
            r"exceed(?:s|ed)?\s+(?:the\s+)?(?:maximum\s+)?(?:incoming\s+|allowed\s+)?(?:message\s+)?size|size\s+limit\s+exceeded|"
            r"message\s+length\s+exceeds|too\s+large\s+for"
        ),
    ),
    # DNS blocklists and IP reputation (Spamhaus, Barracuda, SpamCop, SORBS, Microsoft's
    # "banned sending IP", Yahoo's "[TSS04]", Gmail's "IP reputation").
    (
        "blocked",
        Caseless(
            r"spamhaus|barracuda|spamcop|sorbs|\bdnsbl\b|\brbl\b|uceprotect|black\s*list|"
            r"block\s*list|deny\s*list|listed\s+(?:at|on|in|by)\s+(?:the\s+)?(?!\w+\s+directory)"
            r"[\w.-]*(?:bl|list|spam|rbl)|ip\s+(?:address\s+)?(?:is\s+)?(?:blocked|banned|listed)|"
            r"banned\s+sending\s+ip|client\s+host\s+(?:\[[^\]]*\]\s+)?(?:rejected|blocked)|"
            r"poor\s+reputation|(?:ip|sender|domain)\s+reputation|\[ts[s0]\d+\]|"
            r"blocked\s+(?:using|by|because|due)|(?:are|is)\s+not\s+accepting\s+mail\s+from"
        ),
    ),
    # Relaying (X.7.1 "relay access denied", Exchange 5.7.54 "unable to relay").
    (
        "relay_denied",
        Caseless(
            r"relay(?:ing)?\s+(?:access\s+)?(?:denied|not\s+(?:permitted|allowed))|"
            r"unable\s+to\s+relay|not\s+permitted\s+to\s+relay|we\s+do\s+not\s+relay|"
            r"relaying\s+(?:is\s+)?(?:prohibited|denied)"
        ),
    ),
    # Rate limits and too many recipients (X.5.3, Gmail 4.2.1/4.7.28, greylisting).
    (
        "rate_limited",
        Caseless(
            r"rate\s*limit|too\s+many\s+(?:messages|connections|recipients|mails|emails|"
            r"concurrent)|throttl|receiving\s+mail\s+at\s+a\s+rate|(?:message|sending)\s+rate|"
            r"greylist|graylist|try\s+again\s+later|deferred\s+due\s+to|exceeded\s+the\s+rate|"
            r"temporarily\s+(?:rate\s+)?limited|user\s+is\s+receiving\s+mail\s+too\s+quickly"
        ),
    ),
    # The address does not exist (X.1.1 "bad destination mailbox address", X.1.6 moved).
    (
        "user_unknown",
        Caseless(
            r"user\s*(?:name\s+)?(?:is\s+)?unknown|unknown\s+user|no\s*such\s*(?:user|mailbox|"
            r"recipient|address|account|person|local\s+user)|nosuchuser|"
            r"(?:user|mailbox|address|recipient|account|e-?mail)\s+(?:\S+\s+)?(?:does\s+not|doesn'?t)\s+exist|"
            r"(?:recipient|address|mailbox|user|addressee)\s+(?:is\s+)?(?:unknown|not\s+found|invalid|"
            r"unavailable|not\s+(?:valid|recogni[sz]ed|listed))|invalid\s+(?:recipient|mailbox|address|"
            r"user)|unknown\s+(?:recipient|mailbox|address|local[- ]?part|alias)|addressee\s+unknown|"
            r"not\s+(?:a\s+)?(?:valid|known)\s+(?:user|mailbox|recipient|address)|"
            r"doesn'?t\s+have\s+an?\s+[\w.-]+\s+account|tried\s+to\s+reach\s+does\s+not\s+exist|"
            r"wasn'?t\s+found\s+at|address\s+(?:couldn'?t|could\s+not)\s+be\s+found|address\s+not\s+found|"
            r"no\s+mailbox\s+(?:here|by\s+that\s+name)|"
            r"mailbox\s+not\s+found|recipient\s+not\s+found|recipnotfound|user\s+not\s+known|"
            r"invalid\s+final\s+delivery\s+userid|no\s+matches\s+to\s+nameserver\s+query|"
            r"does\s+not\s+have\s+a\s+final\s+e-?mail\s+delivery\s+point|"
            r"account\s+(?:has\s+been\s+|is\s+|was\s+)?(?:\w+\s+or\s+)?(?:discontinued|closed|deleted|"
            r"terminated|removed|cancell?ed)|"
            r"not\s+listed\s+in\s+(?:the\s+)?(?:domino\s+)?(?:directory|public\s+name|address\s+book|names)|"
            r"no\s+longer\s+(?:valid|active|exists|in\s+use|with|employed|available)|has\s+(?:been\s+)?moved|"
            r"(?:bad|invalid)\s+destination\s+(?:mailbox|address)|address\s+rejected:\s+access\s+denied|"
            r"unbekannt|existiert\s+nicht|inconnu|n'existe\s+pas|desconocido|no\s+existe|sconosciuto|"
            r"inesistente|non\s+esiste|onbekend|bestaat\s+niet|ismeretlen|nieznany|neznám"
        ),
    ),
    # The domain does not exist or takes no mail (X.1.2, X.4.4, null MX RFC 7505 X.1.10).
    (
        "host_unknown",
        Caseless(
            r"host\s+(?:or\s+domain\s+name\s+)?(?:unknown|not\s+found)|unknown\s+(?:host|domain)|"
            r"no\s+such\s+(?:domain|host)|domain\s+(?:name\s+)?(?:not\s+found|does\s+not\s+exist|"
            r"doesn'?t\s+exist|is\s+invalid|unknown)|unrout(?:e)?able\s+(?:mail\s+)?(?:domain|address)|"
            r"no\s+mx\b|null\s+mx|does\s+not\s+accept\s+(?:e-?)?mail|name\s*server\s+error|"
            r"nxdomain|no\s+(?:valid\s+)?(?:mx|mail\s+exchanger)|domain\s+has\s+no\s+mail|"
            r"no\s+route\s+to\s+(?:host|domain)|mail\s+for\s+\S+\s+loops\s+back|"
            r"could\s+not\s+be\s+resolved|dns\s+(?:lookup\s+)?(?:failed|error)\s+for"
        ),
    ),
    # The account exists but is switched off (X.2.1 "mailbox disabled").
    (
        "suspended",
        Caseless(
            r"(?:account|mailbox|user|address)\s+(?:has\s+been\s+|is\s+|was\s+)?(?:temporarily\s+)?"
            r"(?:disabled|suspended|inactive|deactivated|locked|frozen|blocked|on\s+hold)|"
            r"(?:disabled|suspended|inactive|deactivated)\s+(?:account|mailbox|user)|"
            r"not\s+accepting\s+(?:any\s+)?(?:new\s+)?(?:messages|mail)\s+at\s+this\s+time|"
            r"tried\s+to\s+reach\s+(?:is|has\s+been)\s+(?:disabled|suspended|inactive|deactivated)"
        ),
    ),
    # Gave up retrying (X.4.7 "delivery time expired") and network timeouts.
    (
        "expired",
        Caseless(
            r"(?:delivery\s+)?time\s*(?:d\s*)?out|timed\s+out|retry\s+time(?:out)?\s+exceeded|"
            r"(?:message\s+)?expired|too\s+long\s+in\s+(?:the\s+)?queue|could\s+not\s+be\s+delivered\s+"
            r"(?:for|within)\s+\d+|gave\s+up|giving\s+up|no\s+answer\s+from|connection\s+refused|"
            r"delivery\s+(?:has\s+been\s+)?(?:delayed|attempts\s+exhausted)|retry\s+limit|"
            r"not\s+been\s+collected|aborted\s+after"
        ),
    ),
)
# Weaker words that only decide when nothing above matched.
_WEAK_TEXT: tuple[tuple[Reason, Caseless], ...] = (
    (
        "spam_policy",
        Caseless(
            r"spam|junk|unsolicited|policy|content\s+(?:rejected|filter)|virus|malware|"
            r"banned|attachment|\bspf\b|\bdkim\b|\bdmarc\b|authentication|not\s+authori[sz]ed|"
            r"rejected\s+(?:for|due\s+to|because)|message\s+(?:refused|rejected)|phish|"
            r"suspicious|bulk\s+mail|5\.7\.\d+"
        ),
    ),
    (
        "system_error",
        Caseless(
            r"system\s+error|internal\s+(?:server\s+)?error|local\s+error|mail\s+system\s+(?:error|full)|"
            r"too\s+many\s+hops|hop\s+count|routing\s+loop|loop\s+detected|mail\s+loop|looping|"
            r"service\s+(?:not\s+)?(?:un)?available|configuration\s+error|i/o\s+error|"
            r"resources?\s+(?:temporarily\s+)?unavailable|server\s+(?:is\s+)?busy|"
            r"database\s+error|transaction\s+failed"
        ),
    ),
)
# RFC 3463 codes read as reasons when the words say nothing specific.
_STATUS_REASONS: dict[str, Reason] = {
    "1.1": "user_unknown",
    "1.0": "user_unknown",
    "1.3": "user_unknown",
    "1.6": "user_unknown",
    "1.2": "host_unknown",
    "1.10": "host_unknown",
    "4.4": "host_unknown",
    "1.7": "sender_rejected",
    "1.8": "sender_rejected",
    "7.27": "sender_rejected",
    "2.1": "suspended",
    "2.2": "mailbox_full",
    "2.3": "message_too_big",
    "3.4": "message_too_big",
    "4.7": "expired",
    "4.1": "expired",
    "4.2": "expired",
    "5.3": "rate_limited",
    "7.28": "rate_limited",
    "4.5": "system_error",
    "4.6": "system_error",
    "3.0": "system_error",
    "3.1": "mailbox_full",
    "3.2": "system_error",
    "7.1": "spam_policy",
}
_CODE_IN_TEXT_RE = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")


def bounce_reason(
    status: str | None,
    diagnostic: str | None,
    smtp_code: int | None = None,
    context: str = "",
) -> tuple[Reason, Literal["hard", "soft"]]:
    """The reason of a failed delivery and whether the address is dead ("hard").

    The one rule for "this address is dead", used by bounce classification and by the
    SMTP refusal path of the outbox. Inputs: the RFC 3463 enhanced status (`status`),
    the diagnostic (the SMTP reply, a DSN's Diagnostic-Code), the SMTP reply code, and
    `context`, the report's own words around it. Specific wording decides first, the
    diagnostic's before the context's (a "mailbox full" under a wrong 5.1.1, "no such
    user here" under 5.0.0 or 550); then the status code (one in the text is read too,
    it is often finer than the Status field); then weaker wording (policy, system).
    Hard for `user_unknown` and `host_unknown`, and for a permanent failure whose words
    name no reason (`other` under a 5.x.x, a 5xx, "failed permanently"); never for a
    temporary failure (class 4, or an SMTP 4xx without a class 5 code).
    """
    diag = (diagnostic or "")[:4000]
    around = context[:4000]
    both = f"{diag}\n{around}"
    codes = [status] if status else []
    codes += [".".join(m.groups()) for m in _CODE_IN_TEXT_RE.finditer(both)]
    codes = [c for c in codes if c and _CODE_IN_TEXT_RE.fullmatch(c)]
    permanent = any(c.startswith("5.") for c in codes)
    if smtp_code is None:
        smtp = _SMTP_CODE_RE.search(both)
        smtp_code = int(smtp.group(1)) if smtp else None
    temporary = (codes and not permanent) or (
        smtp_code is not None and 400 <= smtp_code < 500 and not permanent
    )
    reason = _specific(diag) or _specific(around)
    if reason is None:
        for code in codes:
            reason = _STATUS_REASONS.get(code.split(".", 1)[1])
            if reason is not None:
                break
    if reason is None:
        reason = next((name for name, regex in _WEAK_TEXT if regex.search(both)), None)
    if reason is None:
        reason = "spam_policy" if any(c.split(".")[1] == "7" for c in codes) else "other"
    hard = reason in HARD_REASONS and not temporary
    if reason == "other" and not temporary:
        # A permanent failure that names no reason: the class decides, as Sisimai does
        # for its "undefined" reason (5.x.x or a 5xx reply, or "failed permanently").
        hard = (
            permanent
            or (smtp_code is not None and smtp_code >= 500)
            or bool(_PERMANENT_RE.search(both))
        )
    return reason, "hard" if hard else "soft"


_PERMANENT_RE = Caseless(
    r"failed\s+permanently|permanent\s+(?:fatal\s+)?(?:error|failure)|permanently\s+failed|"
    r"had\s+permanent\s+fatal\s+errors"
)


def _specific(text: str) -> Reason | None:
    if not text.strip():
        return None
    return next((name for name, regex in _REASON_TEXT if regex.search(text)), None)


def hard_or_soft(
    status: str | None, diagnostic: str | None, smtp_code: int | None = None
) -> Literal["hard", "soft"]:
    """Hard when the address is dead (see `bounce_reason`), else soft."""
    return bounce_reason(status, diagnostic, smtp_code)[1]


def address_is_dead(smtp_code: int | None, status: str | None, message: str) -> bool:
    """Whether an SMTP refusal at send time says the recipient address is dead."""
    return bounce_reason(status, message, smtp_code)[1] == "hard"


def _is_daemon(msg: ParsedMessage) -> bool:
    sender = msg.from_addr or ""
    raw_from = msg.header("from") or ""
    return bool(_DAEMON_RE.match(sender)) or bool(
        re.search(r"(?i)\b(?:mailer-daemon|postmaster|mail\s+delivery\s+sub)", raw_from)
    )


# A report's own words and the returned headers sit in its first part: no detector reads
# further than this, whatever the size of the message.
_SCAN = 100_000


def _human_part(text: str) -> str:
    """The bounce's own words: the text before the copy of the returned message."""
    text = text[:_SCAN]
    cut = len(text)
    marker = _RETURNED_MARKER_RE.search(text)
    if marker:
        cut = marker.start()
    headers = _RETURNED_HEADERS_RE.search(text)
    if headers and headers.start() < cut:
        cut = headers.start()
    return text[:cut]


def _returned_ids(msg: ParsedMessage) -> tuple[str, ...]:
    ids: list[str] = []
    value = msg.returned_header("message-id")
    if value:
        ids += re.findall(r"<([^<>\s]+)>", value) or [value.strip().strip("<>")]
    if not ids:
        # Plain-text bounces quote the returned headers inline.
        for match in re.finditer(r"(?im)^\s*message-id:\s*<([^<>\s]+)>", msg.text[:_SCAN]):
            ids.append(match.group(1))
    return tuple(dict.fromkeys(i for i in ids if i))


def _excluded(msg: ParsedMessage) -> set[str]:
    """Addresses that are never the failed recipient: the report's own parties.

    The returned message's From is not excluded: a message can bounce back from its own
    author's address (and ours is already excluded as the bounce's To).
    """
    out = {a for a in msg.to if a}
    if msg.from_addr:
        out.add(msg.from_addr)
    if msg.return_path:
        out.add(msg.return_path)
    return out


def _usable(addr: str) -> bool:
    local = addr.split("@", 1)[0]
    return not _DAEMON_RE.match(addr) and local not in ("abuse", "help", "support", "hostmaster")


def _addresses_in(text: str, excluded: set[str]) -> list[str]:
    out: list[str] = []
    for raw in _ADDR_RE.findall(text):
        # Exchange writes "dda:SMTP=user@host"; quotes cling to addresses in sloppy text.
        addr = re.sub(r"(?i)^(?:smtp|rfc-?822)=", "", raw.strip(".'`")).lower()
        if addr in excluded or not _usable(addr) or addr in out:
            continue
        out.append(addr)
    return out


_ECHO_RE = re.compile(r"(?i)^\s*(?:to|from|subject|sent|date|cc|reply-to|sender)\s*:")
_ANNOUNCE_RE = Caseless(
    r"following\s+(?:recipients?|addresse?s?|users?|destinations?)|following\s+address\(es\)|"
    r"could\s+not\s+be\s+delivered\s+to|did\s+not\s+reach|failed\s+addresses|"
    r"delivery\s+to\s+the\s+following|not\s+delivered\s+to|unable\s+to\s+deliver|"
    r"delivery\s+of\s+email\s+to|recipients?\s+failed|undeliverable\s+to|"
    r"permanent\s+fatal\s+errors|could\s+not\s+deliver"
)


# "not accepting mail from <our address>", "Sender: ...": the address there is ours.
_SENDER_MENTION_RE = re.compile(
    r"(?i)(?:mail\s+from|from\s+sender|sender(?:\s+address)?|envelope[- ]from|return[- ]path)"
    r"\s*:?\s*<?[^\s<>]+@[^\s<>]+>?"
)
# A bare local part under an announcement (AOL: "could not be delivered ...:\n\tscreenname").
_BARE_LOCAL_RE = re.compile(r"^\s*<?([A-Za-z0-9][\w.+-]{0,63})>?\s*(?:$|\s{2,}\S)")


def _failed_recipients(text: str, excluded: set[str]) -> list[str]:
    """Addresses the bounce text names as failed.

    An address counts when its line states a failure (a reason, an SMTP or status code,
    the qmail/Postfix `<addr>:` form) or when it follows an announcement such as "could
    not be delivered to the following recipients". Echoes of the returned message's own
    headers (`To:`, `From:`) never count. Falls back to every address in the text.
    """
    strong: list[str] = []
    loose: list[str] = []
    announced = -10
    for i, line in enumerate(text.split("\n")):
        if _ECHO_RE.match(line):
            continue
        if _ANNOUNCE_RE.search(line):
            announced = i
        found = _addresses_in(_SENDER_MENTION_RE.sub(" ", line), excluded)
        if not found:
            continue
        if re.search(r"(?i)expanded\s+from", line) and strong:
            # Sendmail names the alias we wrote to under the address it expanded to.
            strong[-1] = found[0]
            continue
        if (
            i - announced <= 3
            or _FAILURE_BODY_RE.search(line)
            or _HARD_TEXT_RE.search(line)
            or _SOFT_TEXT_RE.search(line)
            or _STATUS_RE.search(line)
            or _SMTP_CODE_RE.search(line)
            or re.match(r"^\s*<[^>]+>\s*:", line)
        ):
            strong += [a for a in found if a not in strong]
        loose += [a for a in found if a not in loose]
    return strong or loose


def _bare_recipients(msg: ParsedMessage, human: str) -> list[str]:
    """Recipients named by local part only, completed with a domain.

    The domain is the one the returned message was addressed to when that address has
    the same local part (a `for <user@domain>` in its Received lines, its To), else the
    reporting host's (the bounce's From, e.g. MAILER-DAEMON@aol.com).
    """
    lines = human.split("\n")
    out: list[str] = []
    for i, line in enumerate(lines):
        if not _ANNOUNCE_RE.search(line):
            continue
        for nxt in lines[i + 1 : i + 4]:
            m = _BARE_LOCAL_RE.match(nxt)
            if m and "@" not in nxt and not nxt.strip().endswith(":"):
                out.append(m.group(1).lower())
                break
    if not out:
        return []
    known = _ADDR_RE.findall(msg.text[:200_000]) + [
        a for name, v in msg.returned_headers if name in ("to", "cc") for a in _ADDR_RE.findall(v)
    ]
    host = (msg.from_addr or "").rpartition("@")[2]
    done: list[str] = []
    for local in out:
        same = [a.lower() for a in known if a.lower().split("@", 1)[0] == local]
        if same:
            done.append(same[0])
        elif host:
            done.append(f"{local}@{host}")
    return done


_FIELD_LINE_RE = re.compile(
    r"(?im)^(final-recipient|original-recipient|status|diagnostic-code|action)\s*:\s*(.+)$"
)


def _fields_in_text(text: str) -> list[DeliveryStatus]:
    """DSN fields written in the body: a report whose MIME boundary does not match its
    header is read by a MIME parser as one text part, with the fields inside."""
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for m in _FIELD_LINE_RE.finditer(text[:200_000]):
        name, value = m.group(1).lower(), m.group(2).strip()
        if name in current and name != "diagnostic-code":
            blocks.append(current)
            current = {}
        current[name] = value
    if current:
        blocks.append(current)

    def addr(value: str | None) -> str | None:
        if not value:
            return None
        found = _ADDR_RE.search(value.split(";", 1)[-1])
        return found.group(0).lower() if found else None

    return [
        DeliveryStatus(
            final_recipient=addr(b.get("final-recipient")),
            original_recipient=addr(b.get("original-recipient")),
            action=(b.get("action") or "").lower() or None,
            status=b.get("status"),
            diagnostic_code=b.get("diagnostic-code"),
        )
        for b in blocks
        if b.get("final-recipient") or b.get("original-recipient")
    ]


def _from_dsn(msg: ParsedMessage) -> BounceReport | None:
    blocks = msg.delivery_status
    if not blocks and (
        msg.content_type == "multipart/report" or _is_daemon(msg) or msg.return_path == ""
    ):
        blocks = tuple(_fields_in_text(msg.text[:_SCAN]))
    if not blocks:
        return None
    failed: list[DeliveryStatus] = []
    delayed: list[DeliveryStatus] = []
    delivered: list[DeliveryStatus] = []
    for block in blocks:
        action = (block.action or "").split()[0] if block.action else ""
        code = block.status or ""
        if action.startswith("fail") or (not action and code.startswith("5")):
            failed.append(block)
        elif action.startswith("delay") or (not action and code.startswith("4")):
            delayed.append(block)
        elif action in ("delivered", "relayed", "expanded") or code.startswith("2"):
            delivered.append(block)
    chosen = failed or delayed or delivered
    if not chosen:
        return None
    outcome: Outcome = "failed" if failed else "delayed" if delayed else "delivered"
    excluded = _excluded(msg)
    recipients: list[str] = []
    for block in chosen:
        for candidate in (block.original_recipient, block.final_recipient):
            if candidate and _ADDR_RE.fullmatch(candidate):
                if candidate not in recipients:
                    recipients.append(candidate)
                break
    if not recipients:
        # X.400 gateways and friends: fall back to the addresses the text names.
        recipients = _failed_recipients(_human_part(msg.text), excluded)
        if not recipients:
            recipients = _addresses_in(msg.subject, excluded)
    first = chosen[0]
    status = next((b.status for b in chosen if b.status and _STATUS_RE.fullmatch(b.status)), None)
    diagnostic = next((b.diagnostic_code for b in chosen if b.diagnostic_code), None)
    if status is None:
        for b in chosen:
            found = _STATUS_RE.search(f"{b.status or ''} {b.diagnostic_code or ''}")
            if found:
                status = found.group(0)
                break
    diagnostics = " ".join(b.diagnostic_code for b in chosen if b.diagnostic_code)
    cause, kind = bounce_reason(status, diagnostics, None, _human_part(msg.text)[:2000])
    reason = f"DSN Action: {(first.action or outcome).split()[0]}" + (
        f", status {status}" if status else ""
    )
    return BounceReport(
        outcome=outcome,
        kind=kind,
        recipients=tuple(recipients),
        status=status,
        diagnostic=diagnostic,
        original_message_ids=_returned_ids(msg),
        reason=reason,
        cause=cause,
    )


# Mailing-list managers refusing our post (Mailman, LISTSERV, Sympa, Google Groups).
_LIST_MANAGER_RE = re.compile(
    r"(?i)^(?:[\w.-]+-(?:owner|bounces?|request|admin)(?:\+[^@]*)?|owner-[\w.-]+|mailman|"
    r"listserv|sympa|majordomo|ezmlm|lyris|googlegroups-noreply)@|@googlegroups\.com$"
)
_LIST_REJECT_RE = Caseless(
    r"you\s+are\s+not\s+a\s+member|not\s+a\s+(?:list\s+)?member|\bnon-?member|"
    r"members[- ]only|only\s+members\s+(?:can|may)\s+(?:post|send)|"
    r"(?:are\s+not|aren't)\s+(?:allowed|authori[sz]ed|permitted)\s+to\s+(?:post|send)|"
    r"(?:do|does)\s+not\s+have\s+permission\s+to\s+post|you\s+must\s+be\s+(?:a\s+)?(?:member|"
    r"subscribed)|posting\s+(?:is\s+)?restricted|rejected\s+by\s+(?:the\s+)?(?:list\s+)?moderator"
)
# What delivery software writes and people do not: "your message could not be delivered
# to", Sendmail's "permanent fatal errors", the French/German/Spanish/Italian forms.
_STRONG_FAILURE_RE = Caseless(
    r"message\s+(?:could\s+not|cannot|couldn't|was\s+not)\s+be(?:en)?\s+delivered|"
    r"could\s+not\s+be\s+delivered\s+to|wasn't\s+able\s+to\s+deliver|unable\s+to\s+deliver\s+"
    r"(?:your\s+)?(?:message|mail)|delivery\s+to\s+the\s+following\s+recipients?\s+failed|"
    r"permanent\s+fatal\s+errors|undeliverable\s+to|n'a\s+pas\s+pu\s+(?:ê|e)tre\s+d(?:é|e)livr|"
    r"konnte\s+nicht\s+zugestellt|no\s+se\s+ha\s+podido\s+entregar|"
    r"non\s+è\s+stato\s+possibile\s+recapitare"
)
# What makes a report that also says "delayed" a failure.
_PERMANENT_WORDS_RE = Caseless(
    r"permanent|given\s+up|fatal|failed\s+permanently|could\s+not\s+be\s+delivered|"
    r"was\s+not\s+delivered|\b5\d\d\b"
)
# Loop alerts (Exim "Too many \"Received\" headers", Sendmail "Too many hops", qmail loops).
_LOOP_RE = Caseless(
    r"mail\s+loop|loop\s+(?:detected|alert)|too\s+many\s+hops|too\s+many\s+\"?received|"
    r"routing\s+loop|message\s+looping|loops\s+back\s+to\s+myself|hop\s+count\s+exceeded"
)


def _smtp_error(human: str) -> bool:
    """An SMTP error in the first 5,000 characters of a report's words: a reply code
    where MTAs write one, with a status code or the word SMTP, "said:" or "error".
    (A postmaster "Re: ..." with one is a bounce dressed as a reply.)"""
    head = human[:5000]
    if not _THREE_DIGITS_RE.search(head):
        return False  # no reply code at all: one quick scan instead of the one below
    return bool(_SMTP_CODE_RE.search(head)) and bool(
        _STATUS_RE.search(head) or re.search(r"(?i)smtp|said:|error", head)
    )


def _from_text(msg: ParsedMessage) -> BounceReport | None:
    subject = msg.subject
    is_report = msg.report_type == "delivery-status" or (
        msg.content_type == "multipart/report" and msg.report_type in (None, "")
    )
    daemon = _is_daemon(msg) or msg.return_path == ""
    list_manager = bool(_LIST_MANAGER_RE.search(msg.from_addr or ""))
    subject_hit = bool(_BOUNCE_SUBJECT_RE.search(subject)) and not re.match(
        r"(?i)\s*(?:re|aw|sv|antw|r)\s*:", subject
    )
    threaded = bool(msg.in_reply_to or msg.references)
    if not (is_report or daemon or list_manager or subject_hit or not threaded):
        # Only the body could still say "bounce", and for threaded mail it may not
        # decide alone (the test below): skip scanning the body of every reply.
        return None
    human = _human_part(msg.text)
    if not (is_report or daemon or list_manager or subject_hit) and not (
        _smtp_error(human) or _STRONG_FAILURE_RE.search(human[:5000])
    ):
        # Unthreaded mail from a person: only the last test below could pass, and it
        # needs SMTP evidence or delivery software's wording in the first 5,000
        # characters. Without either, skip the failure words over the whole text.
        return None
    body_hit = bool(_FAILURE_BODY_RE.search(human))
    delay_hit = bool(_DELAY_RE.search(subject)) or bool(_DELAY_RE.search(human[:3000]))
    strong_delay = _STRONG_DELAY_RE.search(human[:3000])
    qmail_list = re.search(r"(?m)^\s*<[^<>\s]+@[^<>\s]+>\s*:\s*$", human)
    smtp_error = _smtp_error(human)
    list_reject = (daemon or list_manager) and bool(_LIST_REJECT_RE.search(human[:5000]))
    loop = daemon and bool(_LOOP_RE.search(f"{subject}\n{human[:5000]}"))
    if list_reject or loop:
        body_hit = True
    if not (
        is_report
        or (daemon and (subject_hit or body_hit or qmail_list or smtp_error))
        or list_reject
        or (subject_hit and strong_delay)
        or (subject_hit and body_hit)
        # Unthreaded mail from a person may say "does not exist": without a daemon
        # sender or a bounce subject, failure words count only next to SMTP evidence.
        or (body_hit and not threaded and (smtp_error or _STRONG_FAILURE_RE.search(human[:5000])))
    ):
        return None
    excluded = _excluded(msg)
    recipients = (
        _failed_recipients(human, excluded)
        or _addresses_in(subject, excluded)
        or _bare_recipients(msg, human)
    )
    found = _STATUS_RE.search(human)
    status = found.group(0) if found else None
    permanent_words = _PERMANENT_WORDS_RE.search(human)
    if strong_delay and not (status or "").startswith("5"):
        outcome: Outcome = "delayed"
    elif (
        delay_hit
        and not (status or "").startswith("5")
        and not (
            permanent_words and not re.search(r"(?i)warning|delayed|delay\b|not\s+yet", subject)
        )
    ):
        outcome = "delayed"
    else:
        outcome = "failed"
    diag = None
    for line in human.split("\n"):
        if _HARD_TEXT_RE.search(line) or _SOFT_TEXT_RE.search(line) or _SMTP_CODE_RE.search(line):
            diag = line.strip()[:300] or None
            if diag:
                break
    cause, kind = bounce_reason(status, diag, None, human[:4000])
    if list_reject and cause in ("other", "spam_policy"):
        # The list refuses our sender (not a member): a problem of ours, never a dead lead.
        cause, kind = "sender_rejected", "soft"
    why = (
        "multipart/report" if is_report else "mailer-daemon sender" if daemon else "bounce subject"
    )
    return BounceReport(
        outcome=outcome,
        kind=kind,
        recipients=tuple(recipients),
        status=status,
        diagnostic=diag,
        original_message_ids=_returned_ids(msg),
        reason=f"non-standard bounce ({why}){', status ' + status if status else ''}",
        cause=cause,
    )


# ----------------------------------------------------------------------------- SES / SNS

_SES_MARK_RE = re.compile(r'"(?:notificationType|eventType)"\s*:\s*"(\w+)"')


def provider_notification(msg: ParsedMessage) -> dict[str, Any] | None:
    """An Amazon SES notification in JSON (as mailed by SNS), or None.

    SES documents `notificationType` (or `eventType`) Bounce, Complaint, Delivery and
    DeliveryDelay; SNS wraps the object as a JSON string in `Message`. Read only when the
    body names one of those types; bounded to the first 200 kB.
    """
    text = msg.text[:200_000]
    if "notificationType" not in text and "eventType" not in text:
        return None  # the common case, decided by a substring test
    found = _SES_MARK_RE.search(text) or _SES_MARK_RE.search(text.replace('\\"', '"'))
    if not found or found.group(1) not in ("Bounce", "Complaint", "Delivery", "DeliveryDelay"):
        return None
    try:
        start, end = text.index("{"), text.rindex("}") + 1
        data: Any = json.loads(text[start:end])
        if isinstance(data, dict) and isinstance(data.get("Message"), str):
            data = json.loads(data["Message"])
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    kind = data.get("notificationType") or data.get("eventType")
    return data if kind in ("Bounce", "Complaint", "Delivery", "DeliveryDelay") else None


# SES bounce sub-types (docs: "Amazon SES notification contents", bounce types).
_SES_SUBTYPES: dict[str, Reason] = {
    "NoEmail": "user_unknown",
    "Suppressed": "user_unknown",
    "OnAccountSuppressionList": "user_unknown",
    "MailboxFull": "mailbox_full",
    "MessageTooLarge": "message_too_big",
    "ContentRejected": "spam_policy",
    "AttachmentRejected": "spam_policy",
}


def _from_ses(msg: ParsedMessage) -> BounceReport | None:
    data = provider_notification(msg)
    if data is None:
        return None
    kind = data.get("notificationType") or data.get("eventType")
    mail: dict[str, Any] = data["mail"] if isinstance(data.get("mail"), dict) else {}
    ids = []
    for header in mail.get("headers") or []:
        if isinstance(header, dict) and str(header.get("name", "")).lower() == "message-id":
            ids += re.findall(r"<([^<>\s]+)>", str(header.get("value", "")))
    if kind == "Complaint":
        return None  # a complaint, not a delivery report: classify reads it
    if kind in ("Delivery", "DeliveryDelay"):
        found = data.get("delivery") or data.get("deliveryDelay")
        block: dict[str, Any] = found if isinstance(found, dict) else {}
        recips = block.get("recipients") or [
            r.get("emailAddress")
            for r in block.get("delayedRecipients") or []
            if isinstance(r, dict)
        ]
        return BounceReport(
            outcome="delivered" if kind == "Delivery" else "delayed",
            kind="soft",
            recipients=tuple(str(r).lower() for r in recips if r),
            status=None,
            diagnostic=None,
            original_message_ids=tuple(ids),
            reason=f"SES {kind} notification",
        )
    bounce: dict[str, Any] = data["bounce"] if isinstance(data.get("bounce"), dict) else {}
    rows = [r for r in bounce.get("bouncedRecipients") or [] if isinstance(r, dict)]
    status = next((str(r["status"]) for r in rows if r.get("status")), None)
    diag = next((str(r["diagnosticCode"]) for r in rows if r.get("diagnosticCode")), None)
    cause = bounce_reason(status, diag)[0]
    permanent = bounce.get("bounceType") == "Permanent"
    sub = _SES_SUBTYPES.get(str(bounce.get("bounceSubType")))
    if cause == "other" and sub is not None:
        cause = sub
    elif cause == "other" and permanent:
        cause = "user_unknown"  # SES: a general hard bounce; remove the address
    hard = cause in HARD_REASONS and permanent
    return BounceReport(
        outcome="failed",
        kind="hard" if hard else "soft",
        recipients=tuple(
            str(r.get("emailAddress", "")).lower() for r in rows if r.get("emailAddress")
        ),
        status=status if status and _STATUS_RE.fullmatch(status) else None,
        diagnostic=diag,
        original_message_ids=tuple(ids),
        reason=f"SES bounce notification ({bounce.get('bounceType')}/{bounce.get('bounceSubType')})",
        cause=cause,
    )


def analyse_bounce(msg: ParsedMessage) -> BounceReport | None:
    """The delivery report in `msg`, or None when it is not one.

    Feedback reports (ARF) and read receipts (MDN) are not delivery reports.
    """
    if msg.report_type in ("feedback-report", "disposition-notification"):
        return None
    try:
        return _from_ses(msg) or _from_dsn(msg) or _from_text(msg)
    except Exception:  # a detector bug must not stop classification
        return None
