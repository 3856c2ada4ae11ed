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

import re
from dataclasses import dataclass
from typing import Literal

from worker.parsing import DeliveryStatus, ParsedMessage

__all__ = ["BounceReport", "analyse_bounce", "hard_or_soft"]

Outcome = Literal["failed", "delayed", "delivered"]

_ADDR_RE = re.compile(r"[\w.!#$%&'*+/=?^`{|}~-]+@(?:[\w-]+\.)+[A-Za-z]{2,}|[\w.+-]+@\[[\d.]+\]")
_STATUS_RE = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
# An SMTP reply code where MTAs write one: at the start of a line or after "said:".
_SMTP_CODE_RE = re.compile(r"(?im)(?:^|said:|response:|error:|\)\s*:|\]:)\s*([45]\d\d)(?:[ -]|$)")

_DAEMON_RE = re.compile(
    r"(?i)^\"?(?:mailer[-_.]?daemon|post[-_.]?master|mdaemon|mail[-_.]?delivery[-_.]?system|"
    r"mail[-_.]?delivery[-_.]?subsystem|mailadm|mail[-_.]?admin|smtp[-_.]?gateway|"
    r"[\w.-]*smtp[-_.]?mail[-_.]?service|[\w.-]*antivirus[\w.-]*|imss|inetgw\d*|"
    r"system[-_.]?administrator|\"system administrator\"|noreply-dmarc|bounces?|"
    r"microsoftexchange\w*|mailer)(?:@|\\@)"
)
_BOUNCE_SUBJECT_RE = re.compile(
    r"(?i)undeliver|undelivered|delivery\s+(?:status\s+notification|failure|failed|has\s+failed|"
    r"problem|report|notification)|returned\s+mail|failure\s+notice|mail\s+delivery\s+(?:failed|failure)|"
    r"non[- ]?delivery|could\s+not\s+be\s+delivered|not\s+delivered|delivery\s+failure|"
    r"permanent\s+delivery|mail\s+system\s+error|mail\s+error|nameserver\s+error|failed\s+mail|"
    r"processing\s+error|failure\s+delivery|mail\s+failure|user\s+unknown|mail\s+failed|"
    r"nicht\s+zustellbar|unzustellbar|non\s+remis|non\s+distribuable|no\s+entregado|"
    r"non\s+recapitato|não\s+entregue|onbestelbaar|warning:.*delayed|delivery\s+warning|"
    r"delayed\s+mail|message\s+delayed|not\s+yet\s+been\s+delivered|non\s+recensé|失败|退信"
)
_FAILURE_BODY_RE = re.compile(
    r"(?i)could\s+not\s+be\s+delivered|couldn't\s+be\s+delivered|wasn't\s+able\s+to\s+deliver|"
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
_DELAY_RE = re.compile(
    r"(?i)\bdelayed\b|\bdelay\b|not\s+yet\s+been\s+delivered|will\s+(?:continue|keep)\s+(?:to\s+)?"
    r"(?:try|retry|trying|retrying|attempt)|still\s+being\s+retried|attempts\s+will\s+continue|"
    r"warning\s+message\s+only|do\s+not\s+(?:need\s+to\s+)?resend|no\s+action\s+is\s+required|"
    r"delivery\s+warning|will\s+be\s+retried|temporarily\s+deferred"
)
_STRONG_DELAY_RE = re.compile(
    r"(?i)will\s+(?:continue|keep)\s+(?:to\s+)?(?:try|retry)|attempts\s+will\s+continue|"
    r"still\s+being\s+retried|not\s+yet\s+been\s+delivered|warning\s+message\s+only|"
    r"advisory|has\s+been\s+postponed|will\s+be\s+retried"
)
# Where the copy of the returned message starts in a plain-text bounce.
_RETURNED_MARKER_RE = re.compile(
    r"(?im)^[\s>-]*(?:-{2,}\s*)?(?:below\s+this\s+line\s+is\s+a\s+copy|this\s+is\s+a\s+copy\s+of\s+"
    r"the\s+message|original\s+message\s+follows|the\s+original\s+message\s+follows|"
    r"-+\s*original\s+message|-+\s*returned\s+message|\s*unsent\s+message\s+below|"
    r"-+\s*the\s+header\s+of\s+the\s+original|returned\s+mail\s+follows|"
    r"-+\s*transcript\s+of\s+session\s+follows|message\s+text\s+follows|"
    r"-+\s*message\s+header\s+follows|-+\s*original\s+text\s+follows|"
    r"-+\s*undelivered\s+message|-+\s*this\s+is\s+a\s+copy)"
)
_RETURNED_HEADERS_RE = re.compile(
    r"(?im)^(?:received|return-path|message-id|x-[\w-]+|mime-version):[^\n]*\n(?:[ \t][^\n]*\n)*"
    r"(?:received|return-path|message-id|from|date|subject|to|x-[\w-]+|mime-version|"
    r"content-type):"
)

_HARD_TEXT_RE = re.compile(
    r"(?i)user\s+unknown|unknown\s+user|no\s+such\s+(?:user|mailbox|recipient|address|"
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
_SOFT_TEXT_RE = re.compile(
    r"(?i)mailbox\s+(?:is\s+)?full|over\s*quota|quota\s+exceeded|exceed(?:s|ed)?\s+(?:the\s+)?"
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
    `original_message_ids` the Message-IDs of the returned message, without <>.
    """

    outcome: Outcome
    kind: Literal["hard", "soft"]
    recipients: tuple[str, ...]
    status: str | None
    diagnostic: str | None
    original_message_ids: tuple[str, ...]
    reason: str


def hard_or_soft(status: str | None, diagnostic: str | None) -> Literal["hard", "soft"]:
    """Hard only for a permanent address failure; everything else is soft.

    The status code decides when it is specific (5.1.x, 5.2.1, 5.4.4 hard; 5.2.2, 5.7.x,
    4.x.x soft); a generic code (5.0.0, 5.5.x, none) defers to the diagnostic's words.
    """
    text = diagnostic or ""
    # Diagnostics often carry a more precise code than the Status field ("5.0.0" vs 5.1.1).
    codes = [status] if status else []
    codes += [".".join(m.groups()) for m in _STATUS_RE.finditer(text)]
    for code in codes:
        if not code or not _STATUS_RE.fullmatch(code):
            continue
        klass, subject, detail = code.split(".")
        if klass == "4":
            return "soft"
        if klass == "5":
            if subject == "1" and detail in ("1", "2", "3", "6", "10"):
                return "hard"
            if (subject, detail) in (("2", "1"), ("4", "4"), ("1", "0")):
                return "hard" if not _SOFT_TEXT_RE.search(text) else "soft"
            if subject in ("2", "3", "7") or (subject, detail) in (("4", "7"), ("4", "6")):
                return "soft"
    if _SOFT_TEXT_RE.search(text) and not _HARD_TEXT_RE.search(text):
        return "soft"
    if _HARD_TEXT_RE.search(text):
        smtp = _SMTP_CODE_RE.search(text)
        if smtp and smtp.group(1).startswith("4"):
            return "soft"
        return "hard"
    return "soft"


def _is_daemon(msg: ParsedMessage) -> bool:
    sender = msg.from_addr or ""
    raw_from = msg.header("from") or ""
    return bool(_DAEMON_RE.match(sender)) or bool(
        re.search(r"(?i)\b(?:mailer-daemon|postmaster|mail\s+delivery\s+sub)", raw_from)
    )


def _human_part(text: str) -> str:
    """The bounce's own words: the text before the copy of the returned message."""
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
        for match in re.finditer(r"(?im)^\s*message-id:\s*<([^<>\s]+)>", msg.text):
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
_ANNOUNCE_RE = re.compile(
    r"(?i)following\s+(?:recipients?|addresse?s?|users?|destinations?)|following\s+address\(es\)|"
    r"could\s+not\s+be\s+delivered\s+to|did\s+not\s+reach|failed\s+addresses|"
    r"delivery\s+to\s+the\s+following|not\s+delivered\s+to|unable\s+to\s+deliver|"
    r"delivery\s+of\s+email\s+to|recipients?\s+failed|undeliverable\s+to|"
    r"permanent\s+fatal\s+errors|could\s+not\s+deliver"
)


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
        found = _addresses_in(line, excluded)
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


def _from_dsn(msg: ParsedMessage) -> BounceReport | None:
    blocks = msg.delivery_status
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
    detail = " ".join(filter(None, [diagnostic, first.status, _human_part(msg.text)[:2000]]))
    kind = hard_or_soft(status, detail)
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
    )


def _from_text(msg: ParsedMessage) -> BounceReport | None:
    subject = msg.subject
    is_report = msg.report_type == "delivery-status" or (
        msg.content_type == "multipart/report" and msg.report_type in (None, "")
    )
    daemon = _is_daemon(msg) or msg.return_path == ""
    subject_hit = bool(_BOUNCE_SUBJECT_RE.search(subject)) and not re.match(
        r"(?i)\s*(?:re|aw|sv|antw|r)\s*:", subject
    )
    threaded = bool(msg.in_reply_to or msg.references)
    if not (is_report or daemon or subject_hit or not threaded):
        # Only the body could still say "bounce", and for threaded mail it may not
        # decide alone (the test below): skip scanning the body of every reply.
        return None
    human = _human_part(msg.text)
    body_hit = bool(_FAILURE_BODY_RE.search(human))
    delay_hit = bool(_DELAY_RE.search(subject)) or bool(_DELAY_RE.search(human[:3000]))
    strong_delay = _STRONG_DELAY_RE.search(human[:3000])
    qmail_list = re.search(r"(?m)^\s*<[^<>\s]+@[^<>\s]+>\s*:\s*$", human)
    if not (
        is_report
        or (daemon and (subject_hit or body_hit or qmail_list))
        or (subject_hit and strong_delay)
        or (subject_hit and body_hit)
        or (body_hit and not msg.in_reply_to and not msg.references)
    ):
        return None
    excluded = _excluded(msg)
    recipients = _failed_recipients(human, excluded) or _addresses_in(subject, excluded)
    found = _STATUS_RE.search(human)
    status = found.group(0) if found else None
    permanent_words = re.search(
        r"(?i)permanent|given\s+up|fatal|failed\s+permanently|could\s+not\s+be\s+delivered|"
        r"was\s+not\s+delivered|\b5\d\d\b",
        human,
    )
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
    kind = hard_or_soft(status, human[:4000])
    diag = None
    for line in human.split("\n"):
        if _HARD_TEXT_RE.search(line) or _SOFT_TEXT_RE.search(line) or _SMTP_CODE_RE.search(line):
            diag = line.strip()[:300] or None
            if diag:
                break
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
    )


def analyse_bounce(msg: ParsedMessage) -> BounceReport | None:
    """The delivery report in `msg`, or None when it is not one.

    Feedback reports (ARF) and read receipts (MDN) are not delivery reports.
    """
    if msg.report_type in ("feedback-report", "disposition-notification"):
        return None
    try:
        return _from_dsn(msg) or _from_text(msg)
    except Exception:  # a detector bug must not stop classification
        return None
