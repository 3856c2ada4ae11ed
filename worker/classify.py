"""What kind of inbound message is this? A pure function of a `ParsedMessage`.

The order is DESIGN.md's, first match wins: ours, bounce, complaint, auto_reply,
notification, unsubscribe, bulk, reply. Delivery reports that are not failures (delay
warnings, success notices) and read receipts are recognised in the bounce step, because
they are reports too, and come out as "notification" — never as a reply.

No I/O, no database, no config: what the worker knows about itself comes in a
`ClassifyContext`. `classify` never raises.
"""

from __future__ import annotations

import calendar
import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Literal

from worker.bounces import Reason, analyse_bounce, provider_notification
from worker.caseless import Caseless
from worker.parsing import ParsedMessage
from worker.replytext import (
    Intent,
    detect_intent,
    extract_reply_text,
    new_words,
    quotes_history,
    wants_unsubscribe,
)

__all__ = [
    "Bounce",
    "Classification",
    "ClassifyContext",
    "Intent",
    "Kind",
    "Reason",
    "classify",
    "extract_reply_text",
    "find_return_date",
]

Kind = Literal[
    "ours", "bounce", "complaint", "auto_reply", "notification", "unsubscribe", "bulk", "reply"
]


@dataclass(frozen=True)
class Bounce:
    """A failed delivery of our mail: hard (address dead) or soft (try again later)."""

    type: Literal["hard", "soft"]
    recipients: tuple[str, ...]
    status: str | None
    diagnostic: str | None
    original_message_ids: tuple[str, ...]
    reason: Reason = "other"

    def as_json(self) -> dict[str, object]:
        """The stable JSON shape: type, reason, recipients, status, diagnostic, message ids."""
        return {
            "type": self.type,
            "reason": self.reason,
            "recipients": list(self.recipients),
            "status": self.status,
            "diagnostic": self.diagnostic,
            "original_message_ids": list(self.original_message_ids),
        }


@dataclass(frozen=True)
class ClassifyContext:
    """What the worker knows about itself. All addresses lower-case.

    `unsubscribe_mailto` is a pattern with `{token}`, e.g.
    "sales+unsubscribe-{token}@example.com". When it is None, any recipient whose local
    part contains "unsubscribe" counts as the unsubscribe address.
    """

    our_addresses: frozenset[str] = frozenset()
    internal_domains: frozenset[str] = frozenset()
    loop_header: str = "X-Twoway-Loop"
    unsubscribe_mailto: str | None = None


@dataclass(frozen=True)
class Classification:
    """The verdict on one message, with the signal that decided it in `reason`."""

    kind: Kind
    reason: str
    bounce: Bounce | None = None
    return_date: date | None = None
    reply_text: str | None = None
    intent: Intent | None = None
    referral_email: str | None = None
    unsubscribe_token: str | None = None


# ----------------------------------------------------------------------------- auto-reply

# The Exchange/Outlook "Automatic reply:" prefix in the Office languages, the older
# "Out of Office AutoReply:" forms, and the words other responders put in the subject
# (Lotus/HCL Notes "AUTO:", "is out of the office"; Zimbra/Gmail/Yahoo vacation
# subjects). Subjects are a backstop: alone they decide only for unthreaded mail.
_AUTO_SUBJECT_RE = re.compile(
    r"(?i)^\s*(?:\[[^\]]*\]\s*)?(?:"
    # en, de, fr, es, it, pt, ca, nl
    r"auto(?:matic|mated)?[\s-]*(?:reply|response|respond(?:er)?)|auto:|autoreply|autoresponder|"
    r"automatische\s+antwort|réponse\s+automatique|respuesta\s+automática|risposta\s+automatica|"
    r"resposta\s+automática|resposta\s+automàtica|automatisch\s+antwoord|"
    # sv, da, nb, fi, is, et, lv, lt
    r"automatiskt\s+svar|automatisk\s+svar|automatisk\s+melding|automaattinen\s+vastaus|"
    r"sjálfvirkt\s+svar|automaatvastus|automaatne\s+vastus|automātiskā\s+atbilde|"
    r"automatinis\s+atsakymas|"
    # pl, cs, sk, hu, ro, hr/sr/bs, sl, bg, ru, uk, el, tr
    r"odpowiedź\s+automatyczna|automatyczna\s+odpowiedź|automatická\s+odpověď|"
    r"automatická\s+odpoveď|automatikus\s+válasz|răspuns\s+automat|automatski\s+odgovor|"
    r"samodejni\s+odgovor|автоматичен\s+отговор|автоматический\s+ответ|автоответ|"
    r"автоматична\s+відповідь|αυτόματη\s+απάντηση|otomatik\s+(?:yanıt|cevap)|"
    # ar, he, fa, hi, th, vi, id/ms, ja, zh, ko
    r"رد\s+تلقائي|الرد\s+التلقائي|תשובה\s+אוטומטית|پاسخ\s+خودکار|स्वचालित\s+उत्तर|"
    r"ตอบกลับอัตโนมัติ|trả\s+lời\s+tự\s+động|balasan\s+(?:otomatis|automatik)|"
    r"自動応答|自動返信|自动回复|自動回覆|自動回复|자동\s*회신|자동\s*응답|"
    # out-of-office words
    r"out\s+of\s+(?:the\s+)?office|ooo\b|abwesenheit(?:snotiz)?|abwesend|absence\s+du\s+bureau|"
    r"fuori\s+sede|fuori\s+ufficio|frånvaro|fravær|poissa|nieobecno|nepřítom|"
    r"absence|absent|ausente|assente|afwezig|niet\s+aanwezig|ausência|fora\s+do\s+escritório|"
    r"away\s+(?:from|until)|on\s+(?:vacation|holiday|leave)|vacation|urlaub|congés|vacaciones|"
    r"ferie|vakantie|férias|semester|loma|urlop|dovolen|szabadság|concediu|отпуск|відпустк|"
    r"im\s+urlaub|en\s+vacances|is\s+out\s+of\s+the\s+office|ist\s+nicht\s+im\s+büro|"
    r"est\s+absent|不在|休假|부재"
    r")"
)
# First-person out-of-office wording, per language. Read only in a message's new text.
_OOO_BODY = (
    # en
    r"\b(?:i\s+am|i'm|i\s+will\s+be|i'll\s+be|we\s+are)\s+(?:currently\s+|now\s+)?(?:out\s+of\s+(?:the\s+)?"
    r"office|away|on\s+(?:vacation|holiday|annual\s+leave|leave|parental\s+leave|maternity\s+leave|"
    r"sick\s+leave|a\s+business\s+trip|pto)|travell?ing|off\s+(?:work|until))|"
    r"out\s+of\s+(?:the\s+)?office\s+(?:until|from|through|till|and|on)|"
    r"limited\s+(?:access\s+to\s+(?:my\s+)?e-?mail|e-?mail\s+access)|"
    r"(?:respond|reply|get\s+back)\s+to\s+(?:your\s+)?(?:e-?mail|message)s?\s+(?:when|upon|after)\s+(?:i|my)\s+return|"
    r"this\s+is\s+an\s+automat(?:ic|ed)\s+(?:reply|response|message)|auto-?generated\s+(?:reply|response)|"
    # de
    r"(?:ich\s+bin|bin\s+ich)\s+(?:bis|vom|ab|derzeit|zurzeit|momentan|aktuell|nicht\s+im\s+büro|"
    r"im\s+urlaub|abwesend|außer\s+haus|auf\s+dienstreise)|nicht\s+im\s+büro|außer\s+haus|"
    r"abwesenheitsnotiz|in\s+dringenden\s+fällen|"
    # fr
    r"je\s+suis\s+(?:actuellement\s+)?(?:absente?|en\s+(?:congés?|vacances|déplacement))|"
    r"je\s+serai\s+absente?|absente?\s+du\s+bureau|en\s+cas\s+d'urgence|"
    # es, ca
    r"(?:estoy|estaré|me\s+encuentro)\s+(?:fuera\s+de\s+la\s+oficina|de\s+vacaciones|ausente|fuera)|"
    r"en\s+caso\s+de\s+urgencia|estic\s+(?:fora\s+de\s+l'oficina|de\s+vacances)|"
    # it
    r"(?:sono|sarò)\s+(?:fuori\s+(?:ufficio|sede)|in\s+ferie|assente)|in\s+caso\s+di\s+urgenza|"
    # pt
    r"(?:estou|estarei)\s+(?:fora\s+do\s+escritório|de\s+férias|ausente)|em\s+caso\s+de\s+urgência|"
    # nl
    r"(?:ik\s+ben|ben\s+ik)\s+(?:afwezig|met\s+vakantie|niet\s+aanwezig|niet\s+op\s+kantoor|"
    r"op\s+vakantie)|in\s+dringende\s+gevallen|"
    # sv, da, nb
    r"jag\s+är\s+(?:ledig|på\s+semester|borta|frånvarande|tjänstledig)|"
    r"jeg\s+er\s+(?:på\s+ferie|fraværende|borte|ikke\s+på\s+kontoret|ude\s+af\s+kontoret)|"
    r"(?:ikke|inte)\s+på\s+kontoret|"
    # fi, et, lv, lt
    r"olen\s+(?:lomalla|poissa|matkoilla)|poissa\s+toimistolta|olen\s+puhkusel|"
    r"esmu\s+atvaļinājumā|esu\s+atostogose|"
    # pl, cs, sk, hu, ro, sl, hr/sr
    r"(?:jestem|przebywam)\s+(?:na\s+urlopie|poza\s+biurem)|nieobecn[ya]\s+w\s+biurze|"
    r"jsem\s+(?:na\s+dovolené|mimo\s+kancelář|nepřítomn[ýá])|som\s+(?:na\s+dovolenke|mimo\s+kancelárie)|"
    r"szabadságon\s+vagyok|házon\s+kívül|irodán\s+kívül|"
    r"sunt\s+(?:în\s+concediu|plecat[ăa]?|în\s+afara\s+biroului)|"
    r"sem\s+na\s+dopustu|(?:sam\s+)?na\s+godišnjem\s+odmoru|izvan\s+ureda|"
    # ru, uk, bg, el, tr
    r"(?:я\s+)?(?:нахожусь\s+)?в\s+отпуске|вне\s+офиса|(?:я\s+)?(?:перебуваю\s+)?у\s+відпустці|"
    r"поза\s+офісом|в\s+отпуск\s+съм|извън\s+офиса|"
    r"(?:είμαι|βρίσκομαι)\s+(?:εκτός\s+γραφείου|σε\s+άδεια)|"
    r"ofis\s+dışındayım|izindeyim|tatildeyim|"
    # ar, he, ja, zh, ko, vi, id/ms, th, hi
    r"خارج\s+المكتب|في\s+إجازة|מחוץ\s+למשרד|בחופשה|"
    r"不在にして|休暇中|不在办公室|不在辦公室|休假中|正在休假|부재\s*중|휴가\s*중|"
    r"đang\s+nghỉ\s+phép|không\s+có\s+mặt\s+tại\s+văn\s+phòng|sedang\s+cuti|"
    r"di\s+luar\s+kantor|ไม่อยู่ที่สำนักงาน|ลาพักร้อน|कार्यालय\s+से\s+बाहर"
)
# Challenge-response systems (Bluebottle, SpamArrest, Boxbe, ChoiceMail, EarthLink's
# spamBlocker, Mailinator-style): the sender is asked to prove it is a person.
_CHALLENGE = (
    r"please\s+(?:verify|confirm)\s+(?:that\s+)?you\s+are\s+(?:a\s+)?(?:human|real\s+person|person)|"
    r"(?:verify|confirm)\s+your\s+(?:e-?mail\s+)?address\s+(?:to|so)\s+(?:deliver|complete)|"
    r"(?:add|added)\s+(?:yourself|you)\s+to\s+(?:my|the|our)\s+(?:allow|white|approved|guest|safe|"
    r"trusted)[\s-]*(?:list|senders?)|"
    r"(?:approved|verified)\s+senders?\s+list|challenge[- ]response|spam\s*arrest|boxbe|"
    r"bluebottle|choicemail|spamblocker|i\s+(?:now\s+)?(?:only\s+)?(?:allow|accept)\s+(?:incoming\s+)?"
    r"(?:messages|e-?mails?)\s+only\s+from|only\s+from\s+senders\s+i\s+have\s+approved|"
    r"(?:is|are)\s+(?:being\s+)?held\s+(?:pending|until)\s+(?:you\s+)?(?:verif|confirm)|"
    r"click\s+(?:on\s+)?(?:the|this)\s+link\s+(?:below\s+)?to\s+(?:verify|confirm|prove)"
)
# Ticket systems' acknowledgements.
_ACK_BODY = (
    r"we\s+have\s+received\s+your\s+(?:request|message|e-?mail)|"
    r"(?:your|a)\s+(?:support\s+)?(?:ticket|request)\s+(?:has\s+been\s+(?:created|received|opened)|number)|"
    r"wir\s+haben\s+ihre\s+(?:anfrage|nachricht)\s+erhalten|nous\s+avons\s+(?:bien\s+)?reçu\s+votre|"
    r"hemos\s+recibido\s+su|abbiamo\s+ricevuto\s+la\s+(?:tua|sua)|recebemos\s+(?:a\s+)?sua|"
    r"wij\s+hebben\s+uw\s+(?:aanvraag|bericht)\s+ontvangen"
)
_BODY_SIGNAL_RE = Caseless(f"(?P<challenge>{_CHALLENGE})|(?P<ooo>{_OOO_BODY})|(?P<ack>{_ACK_BODY})")
_AUTO_BODY_RE = Caseless("|".join(f"(?:{words})" for words in (_OOO_BODY, _CHALLENGE, _ACK_BODY)))
_REPLY_PREFIX_RE = re.compile(r"(?i)\s*(?:re|aw|sv|antw|r|rif|réf|ref)\s*:")


def strip_reply_prefixes(subject: str) -> str:
    """The subject without its leading reply prefixes ("Re: AW: Offer" -> "Offer")."""
    subject = subject.strip()
    while m := _REPLY_PREFIX_RE.match(subject):
        subject = subject[m.end() :].strip()
    return subject


_TICKET_SUBJECT_RE = re.compile(
    r"(?i)\[?(?:#|ticket\s*#?|request\s*#?|case\s*#?)\s*\d{3,}\]?|\[request\s+received\]"
)
_NOREPLY_RE = re.compile(
    r"(?i)^(?:no[-_.]?reply|do[-_.]?not[-_.]?reply|donotreply|notifications?|support|helpdesk)\b"
)


def _auto_reply_signal(msg: ParsedMessage) -> str | None:
    """The header that marks `msg` as machine-written, or None. Strong signals only."""
    auto = msg.header("auto-submitted")
    if auto is not None:
        value = auto.strip().lower()
        if value and not value.startswith("no"):
            return f"Auto-Submitted: {auto.strip()}"
    for name in (
        "x-autoreply",
        "x-autorespond",
        "x-autoreply-from",
        "x-mail-autoreply",
        "x-autoresponse",
    ):
        vendor = msg.header(name)
        if vendor is not None and vendor.strip().lower() not in ("no", "false", "0"):
            return f"{name}: {vendor.strip()}"
    value = msg.header("x-autogenerated") or ""
    if value and value.strip().lower() in (
        "reply",
        "forward",
        "group",
        "letter",
        "mirror",
        "redirect",
    ):
        return f"X-Autogenerated: {value.strip()}"
    value = msg.header("x-post-messageclass") or ""
    if "autoresponder" in value.lower():
        return "X-POST-MessageClass: Autoresponder"
    if (msg.header("x-fc-machinegenerated") or "").strip().lower() == "true":
        return "X-FC-MachineGenerated: true"
    for name in ("precedence", "x-precedence", "preference"):
        value = (msg.header(name) or "").strip().lower()
        if value.replace("-", "_") == "auto_reply":
            return f"{name}: auto_reply"
    if any(v.strip().lower() == "autoresponder" for v in msg.header_all("delivered-to")):
        return "Delivered-To: Autoresponder"
    apple = (msg.header("x-apple-action") or "").strip().upper()
    if apple == "VACATION" or "VACATION" in (msg.header("x-apple-criteria") or "").upper():
        return "X-Apple-Action: VACATION"
    if msg.header("x-ms-exchange-inbox-rules-loop") is not None and (
        msg.header("x-auto-response-suppress") is not None or msg.return_path == ""
    ):
        # Exchange OOF: the rules-loop header alone is set by ordinary server-side rules too.
        return "X-MS-Exchange-Inbox-Rules-Loop with X-Auto-Response-Suppress"
    return None


def _body_auto_reply(msg: ParsedMessage, reply_text: str) -> str | None:
    """Out-of-office or challenge-response wording in what the sender wrote now.

    A first-class signal (not only a subject backstop): an out-of-office typed into the
    body of a "Re:" with no auto headers, or under `Auto-Submitted: no`, is still one.
    It decides only for a short new text that does not also ask for something (a person
    who mentions a holiday and asks for pricing is a person), and reads at most 3000
    characters of it.
    """
    if any(name.startswith(("x-boxbe", "x-spamarrest", "x-bluebottle")) for name, _ in msg.headers):
        return "challenge-response headers"
    new = new_words(reply_text)
    if len(new) >= 3000:
        return None  # machines' notices are short; a long text is a person writing
    # One pass over the opening of the text, where these notices say what they are.
    found = _BODY_SIGNAL_RE.search(new[:1000])
    if found is None:
        return None
    if found.lastgroup == "challenge":
        return "challenge-response wording"
    if found.lastgroup == "ooo":
        if detect_intent(new)[0] != "positive":
            return "out-of-office wording in the new text"
        return None
    # "We have received your request" is a ticket system when something else says so: a
    # ticket number, a no-reply sender, or the message calling itself automated.
    if (
        _TICKET_SUBJECT_RE.search(msg.subject)
        or (msg.from_addr and _NOREPLY_RE.match(msg.from_addr))
        or _ACK_SECOND_RE.search(new)
    ):
        return "ticket acknowledgement wording"
    return None


_ACK_SECOND_RE = re.compile(
    r"(?i)automat(?:ic|ed|ically)|do\s+not\s+reply|don't\s+reply|ticket\s*(?:#|number|id)|"
    r"case\s+(?:#|number)|reference\s+number|within\s+\d+\s+(?:business\s+)?(?:hours|days)"
)


_JMRP_SUBJECT_RE = re.compile(r"(?i)^\s*complaint\s+about\s+message\s+from\b")
_MICROSOFT_DOMAINS = ("hotmail.com", "outlook.com", "live.com", "msn.com", "microsoft.com")


def _complaint_signal(msg: ParsedMessage) -> str | None:
    """A spam complaint: ARF (RFC 5965), Microsoft JMRP, or an SES JSON notification."""
    if msg.report_type == "feedback-report" or any(
        name == "feedback-type" for name, _ in msg.report_fields
    ):
        ftype = next((v for n, v in msg.report_fields if n == "feedback-type"), "abuse")
        return f"ARF feedback report ({ftype})"
    # JMRP (Outlook.com's junk mail reporting): subject "complaint about message from
    # <ip>", the reported message attached with X-HmXmrOriginalRecipient.
    jmrp_header = any(n == "x-hmxmroriginalrecipient" for n, _ in msg.returned_headers)
    sender_domain = (msg.from_addr or "").rpartition("@")[2]
    if jmrp_header or (
        (_JMRP_SUBJECT_RE.match(msg.subject) or sender_domain.endswith(_MICROSOFT_DOMAINS))
        and "x-hmxmroriginalrecipient" in msg.text[:100_000].lower()
    ):
        return "Microsoft JMRP complaint (X-HmXmrOriginalRecipient)"
    if _JMRP_SUBJECT_RE.match(msg.subject) and sender_domain.endswith(_MICROSOFT_DOMAINS):
        return "Microsoft JMRP complaint (subject)"
    data = provider_notification(msg)
    if data is not None and (data.get("notificationType") or data.get("eventType")) == "Complaint":
        return "SES complaint notification"
    return None


def _subject_auto_reply(msg: ParsedMessage, body: str) -> str | None:
    """Subject patterns are a backstop: alone they decide only for mail not threaded to us."""
    subject = msg.subject
    if _REPLY_PREFIX_RE.match(subject) or re.match(r"(?i)\s*(?:fw|fwd|wg)\s*:", subject):
        return None  # "Re: Out of office plans" is a person writing
    threaded = bool(msg.in_reply_to or msg.references)
    ticket = bool(_TICKET_SUBJECT_RE.search(subject))
    if not _AUTO_SUBJECT_RE.search(subject) and not ticket:
        return None
    seconds = []
    if msg.return_path == "":
        seconds.append("null Return-Path")
    if (msg.header("precedence") or "").strip().lower() in ("bulk", "junk", "list"):
        seconds.append("Precedence")
    if msg.header("x-auto-response-suppress") is not None:
        seconds.append("X-Auto-Response-Suppress")
    if _AUTO_BODY_RE.search(body[:3000]):
        seconds.append("auto-reply wording")
    if msg.from_addr and _NOREPLY_RE.match(msg.from_addr):
        seconds.append("no-reply sender")
    if ticket and not _AUTO_SUBJECT_RE.search(subject):
        # A ticket number alone is just a subject; require the acknowledgement wording.
        return "ticket acknowledgement" if "auto-reply wording" in seconds else None
    if seconds:
        return f"subject {subject[:40]!r} with {seconds[0]}"
    if not threaded:
        return f"subject {subject[:40]!r}"
    return None


# ----------------------------------------------------------------------------- return dates

_MONTHS: dict[str, int] = {}
for _number, _names in enumerate(
    [
        "january jan januar janvier janv enero ene gennaio genn gen janeiro januari",
        "february feb februar févr fevrier février febrero febbraio fevereiro fev februari",
        "march mar märz maerz mrz mars marzo março marco maart mrt",
        "april apr avril avr abril abr aprile",
        "may mai mayo maggio mag maio mei",
        "june jun juni juin junio giugno giu junho",
        "july jul juli juillet juil julio luglio lug julho",
        "august aug august août aout agosto ago augustus",
        "september sep sept septembre septiembre settembre set setembro",
        "october oct oktober octobre octubre ottobre ott outubro out okt",
        "november nov novembre noviembre novembro",
        "december dec dezember déc decembre décembre diciembre dic dicembre dezembro dez",
    ],
    start=1,
):
    for _name in _names.split():
        _MONTHS.setdefault(_name, _number)
# Month names of the Nordic, Slavic, Baltic, Finnic, Hungarian, Romanian, Turkish and
# Greek calendars, with the genitive forms dates use ("14 декабря", "14. prosince").
for _number, _names in enumerate(
    [
        "januar januari tammikuuta tammikuu stycznia styczeń ledna leden января январь "
        "січня січень януари január ianuarie ocak ιανουαρίου ιανουάριος sausio janvāris jaanuar",
        "februar februari helmikuuta helmikuu lutego luty února únor февраля февраль лютого "
        "лютий февруари február februarie şubat şubat φεβρουαρίου vasario februāris veebruar",
        "marts mars maaliskuuta maaliskuu marca marzec března březen марта март березня "
        "березень март március martie mart μαρτίου kovo marts märts",
        "april huhtikuuta huhtikuu kwietnia kwiecień dubna duben апреля апрель квітня "
        "квітень април április aprilie nisan απριλίου balandžio aprīlis aprill",
        "maj toukokuuta toukokuu maja května květen мая май травня травень május mai mayıs "
        "μαΐου μαΐου gegužės maijs",
        "juni juni kesäkuuta kesäkuu czerwca czerwiec června červen июня июнь червня "
        "червень юни június iunie haziran ιουνίου birželio jūnijs juuni",
        "juli heinäkuuta heinäkuu lipca lipiec července červenec июля июль липня липень "
        "юли július iulie temmuz ιουλίου liepos jūlijs juuli",
        "augusti august elokuuta elokuu sierpnia sierpień srpna srpen августа август "
        "серпня серпень август augusztus ağustos αυγούστου rugpjūčio augusts",
        "september syyskuuta syyskuu września wrzesień září сентября сентябрь вересня "
        "вересень септември szeptember septembrie eylül σεπτεμβρίου rugsėjo septembris",
        "oktober lokakuuta lokakuu października październik října říjen октября октябрь "
        "жовтня жовтень октомври október octombrie ekim οκτωβρίου spalio oktobris",
        "november marraskuuta marraskuu listopada listopad listopadu ноября ноябрь "
        "листопада листопад ноември noiembrie kasım νοεμβρίου lapkričio novembris",
        "december desember joulukuuta joulukuu grudnia grudzień prosince prosinec декабря "
        "декабрь грудня грудень декември decembrie aralık δεκεμβρίου gruodžio decembris detsember",
    ],
    start=1,
):
    for _name in _names.split():
        _MONTHS.setdefault(_name, _number)

# A month is any word looked up in _MONTHS afterwards: one dictionary lookup per
# candidate instead of a 300-name alternation tried at every position of the text.
_WORD = r"[^\W\d_]{3,14}"
_DATE_RES = [
    # 2026-12-14
    ("ymd", re.compile(r"(?<!\d)(\d{4})-(\d{1,2})-(\d{1,2})(?!\d)")),
    # 2026年12月14日, 2026년 12월 14일, 12月14日 (Japanese, Chinese, Korean)
    ("cjk", re.compile(r"(?:(\d{4})\s*[年년]\s*)?(\d{1,2})\s*[月월]\s*(\d{1,2})\s*[日일号號]?")),
    # 2026. december 14. (Hungarian: year, month, day)
    ("yMd", re.compile(rf"(?i)(?<!\d)(\d{{4}})\.\s*({_WORD})\s+(\d{{1,2}})(?!\d)")),
    # 14.12.2026, 14/12/2026, 14.12.
    ("dmy", re.compile(r"(?<![\d.])(\d{1,2})[./](\d{1,2})(?:[./](\d{2,4}))?(?![\d/])\.?")),
    # 12 December 2026, 14. Dezember, 3 janvier, 14 de diciembre de 2026, 12th of December
    (
        "dMy",
        re.compile(
            rf"(?i)(?<!\d)(\d{{1,2}})(?:st|nd|rd|th|er|º|°)?\.?\s*(?:of\s+|de\s+)?({_WORD})\.?"
            rf"(?![^\W\d_])(?:,?\s*(?:de\s+)?(\d{{4}}))?"
        ),
    ),
    # December 12, 2026 / Dec 12th
    (
        "Mdy",
        re.compile(
            rf"(?i)(?<![^\W\d_])({_WORD})\.?\s+(\d{{1,2}})(?:st|nd|rd|th)?(?!\d)(?:,?\s+(\d{{4}}))?"
        ),
    ),
]
# Words allowed between a keyword and its date: articles, prepositions, weekdays.
_FILLER = (
    r"the|on|in|at|am|an|ab|zum|zur|den|dem|der|le|la|el|il|lo|o|a|de|del|do|da|em|no|na|dia|día|"
    r"op|van|per|"
    r"including|inclusive|einschließlich|inclus|incluso|incluído|inclusief|"
    r"mon(?:day)?|tue(?:s|sday)?|wed(?:nesday)?|thu(?:rs|rsday)?|fri(?:day)?|sat(?:urday)?|sun(?:day)?|"
    r"montag|dienstag|mittwoch|donnerstag|freitag|samstag|sonntag|mo|di|mi|do|fr|sa|so|"
    r"lundi|mardi|mercredi|jeudi|vendredi|samedi|dimanche|lunes|martes|miércoles|jueves|"
    r"viernes|sábado|domingo|lunedì|martedì|mercoledì|giovedì|venerdì|sabato|"
    r"segunda(?:-feira)?|terça(?:-feira)?|quarta(?:-feira)?|quinta(?:-feira)?|sexta(?:-feira)?|"
    r"maandag|dinsdag|woensdag|donderdag|vrijdag|zaterdag|zondag"
)
_TAIL = rf"(?:[\s,.]+(?:{_FILLER}))*[\s,.]*$"
_RETURN_KW_RE = re.compile(
    r"(?i)\b(?:back|return(?:ing)?|returns|in\s+the\s+office|available\s+again|zurück|"
    r"wieder\s+(?:im\s+büro|erreichbar|da|verfügbar)|wieder|ab|de\s+retour|retour|à\s+partir\s+du|"
    r"dès\s+le|de\s+vuelta|regres(?:o|aré|ar)|vuelvo|a\s+partir\s+del?|rientr(?:o|erò)|"
    r"di\s+ritorno|tornerò|de\s+volta|retorno|regresso|volto|terug|"
    r"weer\s+(?:aanwezig|op\s+kantoor|bereikbaar)|vanaf|"
    # sv, da, nb, fi, et, lv, lt
    r"tillbaka|åter|tilbage|tilbake|retur|palaan|takaisin|tagasi|atgriezīšos|grįšiu|"
    # pl, cs, sk, hu, ro, hr, sl, ca
    r"wracam|wrócę|powrót|powrocie|vrátím|zpět|vrátim|späť|vissza(?:érkezem)?|"
    r"mă\s+întorc|revin|înapoi|vraćam\s+se|vratit\s+ću|vrnem|nazaj|tornaré|de\s+tornada|"
    # ru, uk, bg, el, tr, vi, id
    r"вернусь|выйду|буду\s+на\s+месте|повернуся|повернусь|ще\s+се\s+върна|връщам\s+се|"
    r"επιστρέφω|θα\s+επιστρέψω|επιστροφή|döneceğim|dönüş|trở\s+lại|kembali)" + _TAIL
)
_UNTIL_KW_RE = re.compile(
    r"(?i)\b(?:until|till|through|thru|to|bis|jusqu'?au|jusqu'?à|au|hasta|al|fino\s+al|fino\s+a|"
    r"até|tot(?:\s+en\s+met)?|t/m|"
    r"till(?:\s+och\s+med)?|t\.o\.m|til(?:\s+og\s+med)?|indtil|frem\s+til|do|по|до|"
    r"până\s+(?:la|pe|în)|pana\s+la|έως|μέχρι|fins\s+al?|kuni|līdz|iki|đến|sampai|hingga)" + _TAIL
)


# Languages whose keyword follows the date: Japanese, Chinese, Korean, Finnish,
# Hungarian, Turkish, Estonian ("14.12. alkaen", "december 14-től", "14 Aralık'ta dönüyorum").
_AFTER_RETURN_RE = re.compile(
    r"(?i)^[\s.,'’]*(?:(?:に|から|より)\s*)?(?:戻り|戻る|出社|復帰|回来|回到|返回|복귀|돌아|부터|"
    r"alkaen|lähtien|-?t[óő]l|-?t[aeó]n|'?(?:da|de|ta|te|dan|den|tan|ten)\s+(?:itibaren|dönüyorum|"
    r"döneceğim|ofisteyim)|alates)"
)
_AFTER_UNTIL_RE = re.compile(
    r"(?i)^[\s.,'’]*(?:まで|까지|为止|為止|止|asti|saakka|-?ig\b|'?[ae]?\s*kadar|-?ni\b|"
    r"(?:[\s(]*(?:inclusive|inklusive|einschließlich|inclus|incluso|inclusief|included)))"
)


def _resolve(day: int, month: int, year: int | None, today: date) -> date | None:
    if not (1 <= month <= 12 and 1 <= day <= 31):
        return None
    if year is not None:
        if year < 100:
            year += 2000
        try:
            return date(year, month, day)
        except ValueError:
            return None
    for candidate_year in (today.year, today.year + 1):
        if day > calendar.monthrange(candidate_year, month)[1]:
            continue
        candidate = date(candidate_year, month, day)
        # A date without a year is the next one to come (allow a week of lateness).
        if candidate >= today - timedelta(days=7):
            return candidate
    return None


_DIGIT_RE = re.compile(r"\d")


def _date_matches(
    style: str, regex: re.Pattern[str], text: str, digits: list[int]
) -> Iterator[re.Match[str]]:
    """What `regex.finditer(text)` yields, trying the regex only where a date can start;
    `digits` are the positions of the digits in `text`.

    Every date but "Mdy" starts with a digit. "Mdy" ("December 14") is a word of 3 to 14
    letters, an optional dot and spaces before its first digit, so it starts 3 to 15
    characters before the run of spaces that a digit follows (`str.isspace` is `\\s`).
    """
    pos = 0
    if style != "Mdy":
        for digit in digits:
            if digit >= pos and (match := regex.match(text, digit)) is not None:
                yield match  # its lookbehind still sees the text before
                pos = match.end()
        return
    for digit in digits:
        if digit - 1 < pos or not text[digit - 1].isspace():
            continue
        spaces = digit - 1
        while spaces > pos and text[spaces - 1].isspace():
            spaces -= 1
        for start in range(max(pos, spaces - 15), spaces - 2):
            if (match := regex.match(text, start)) is not None:
                yield match
                pos = match.end()
                break


def find_return_date(text: str, today: date) -> date | None:
    """The date an out-of-office says its author is back, or None.

    "back on / returning / zurück am / de retour le / rientro il / terug op X" gives X;
    "until / bis / jusqu'au / hasta / fino al / até / tot X" gives the day after X.
    Without such a word, the latest future date in the text counts as "until".
    Years missing from the text are resolved against `today`.
    """
    found: list[tuple[int, date, str]] = []
    digits = [digit.start() for digit in _DIGIT_RE.finditer(text)]
    for style, regex in _DATE_RES:
        for match in _date_matches(style, regex, text, digits):
            groups = match.groups()
            try:
                if style == "cjk":
                    year = int(groups[0]) if groups[0] else None
                    value = _resolve(int(groups[2]), int(groups[1]), year, today)
                elif style == "yMd":
                    value = _resolve(
                        int(groups[2]), _MONTHS[groups[1].lower()], int(groups[0]), today
                    )
                elif style == "ymd":
                    value = _resolve(int(groups[2]), int(groups[1]), int(groups[0]), today)
                elif style == "dmy":
                    year = int(groups[2]) if groups[2] else None
                    if year is None and not match.group(0).endswith("."):
                        continue  # "3/4" alone is too ambiguous (a fraction, a time)
                    day, month = int(groups[0]), int(groups[1])
                    if month > 12 and day <= 12:
                        day, month = month, day  # US order: 12/14/2026
                    value = _resolve(day, month, year, today)
                elif style == "dMy":
                    value = _resolve(
                        int(groups[0]),
                        _MONTHS[groups[1].lower()],
                        int(groups[2]) if groups[2] else None,
                        today,
                    )
                else:
                    value = _resolve(
                        int(groups[1]),
                        _MONTHS[groups[0].lower()],
                        int(groups[2]) if groups[2] else None,
                        today,
                    )
            except (ValueError, KeyError):
                continue
            if value is None or any(
                start <= match.start() < start + 12 and v == value for start, v, _ in found
            ):
                continue
            after = text[match.end() : match.end() + 30]
            if _AFTER_RETURN_RE.match(after):
                found.append((match.start(), value, "return"))
                continue
            if _AFTER_UNTIL_RE.match(after):
                found.append((match.start(), value, "until"))
                continue
            before = text[max(0, match.start() - 60) : match.start()]
            sentence = re.split(r"[.!?\n]\s", before)[-1]
            kind = (
                "return"
                if _RETURN_KW_RE.search(sentence)
                else "until"
                if _UNTIL_KW_RE.search(sentence)
                else ""
            )
            found.append((match.start(), value, kind))
    found.sort()
    # "Out until Friday 11 December, back on Monday 14 December": the return date wins.
    for _pos, value, kind in found:
        if kind == "return" and value > today:  # "ab 01.12. nicht im Büro" starts the absence
            return value
    for _pos, value, kind in found:
        if kind == "until":
            return value + timedelta(days=1)
    future = [value for _pos, value, _kind in found if value >= today]
    return max(future) + timedelta(days=1) if future else None


# ----------------------------------------------------------------------------- helpers

# List headers (RFC 2369/2919) and list software: this is list mail, threaded or not.
_LIST_HEADERS = ("list-id", "list-unsubscribe", "list-post", "x-mailman-version", "x-beenthere")
# Sending-service headers: also found on a person's mail relayed through an ESP by their
# company, so they mark bulk only on mail that does not reply to anything.
_ESP_HEADERS = (
    "feedback-id",
    "x-ses-outgoing",
    "x-sg-eid",
    "x-campaign",
    "x-campaignid",
    "x-mailchimp-campaign",
    "x-mc-user",
    "x-mailgun-tag",
    "x-mailgun-sid",
    "list-unsubscribe-post",
    "x-hs-campaign",
    "x-marketo-id",
)


def _bulk_signal(msg: ParsedMessage) -> str | None:
    for name in _LIST_HEADERS:
        if msg.header(name) is not None:
            return f"{name} header"
    precedence = (msg.header("precedence") or "").strip().lower()
    if precedence in ("bulk", "list", "junk"):
        return f"Precedence: {precedence}"
    sender = (msg.header("sender") or "") + " " + (msg.return_path or "")
    if re.search(r"(?i)[\w.-]+-bounces?(?:\+[^@]*)?@|owner-[\w.-]+@", sender):
        return "list bounce address"
    answers = bool(msg.in_reply_to or msg.references) or bool(_REPLY_PREFIX_RE.match(msg.subject))
    if answers:
        return None
    esp = next((name for name in _ESP_HEADERS if msg.header(name) is not None), None)
    # A person answering through their company's ESP relay quotes what they answer.
    if esp and not quotes_history(msg.text[:100_000]):
        return f"{esp} header"
    return None


def _unsubscribe_regex(pattern: str | None) -> re.Pattern[str]:
    if pattern:
        escaped = re.escape(pattern.lower()).replace(re.escape("{token}"), r"([a-z0-9_-]+)")
        return re.compile(rf"^{escaped}$")
    return re.compile(r"^[^@]*(?:^|[+._-])unsubscribe(?:[+._-]([a-z0-9_-]+))?@")


def _is_ours(addr: str, ctx: ClassifyContext) -> bool:
    """Our own address or its plus/VERP forms (sales+token@example.com)."""
    local, _, domain = addr.lower().partition("@")
    if addr in ctx.our_addresses:
        return True
    base = local.split("+", 1)[0]
    return any(o == f"{base}@{domain}" for o in ctx.our_addresses)


def _threads_to_us(msg: ParsedMessage, ctx: ClassifyContext) -> bool:
    domains = {a.rsplit("@", 1)[-1] for a in ctx.our_addresses} | set(ctx.internal_domains)
    return any(i.rsplit("@", 1)[-1].lower() in domains for i in (*msg.in_reply_to, *msg.references))


def _today(msg: ParsedMessage, today: date | None) -> date:
    if today is not None:
        return today
    if msg.date is not None:
        return msg.date.date()
    return date.today()


# ----------------------------------------------------------------------------- classify


def classify(
    msg: ParsedMessage, ctx: ClassifyContext = ClassifyContext(), today: date | None = None
) -> Classification:
    """Classify one inbound message; first match wins, in DESIGN.md's order.

    `today` resolves out-of-office dates without a year (default: the message's Date,
    else the local date). Never raises: a failure inside a detector gives a "reply"
    with the error in `reason`, the safe default (a human looks at it).
    """
    try:
        return _classify(msg, ctx, _today(msg, today))
    except Exception as exc:  # classification must never stop the worker
        return Classification(kind="reply", reason=f"classifier error: {type(exc).__name__}: {exc}")


def _classify(msg: ParsedMessage, ctx: ClassifyContext, today: date) -> Classification:
    # 0. ours
    if ctx.loop_header and msg.header(ctx.loop_header) is not None:
        return Classification(kind="ours", reason=f"{ctx.loop_header} header")
    if msg.from_addr and msg.from_addr in ctx.our_addresses:
        return Classification(kind="ours", reason=f"sent from our address {msg.from_addr}")

    # 1. bounce (and the reports that are not failures)
    report = analyse_bounce(msg)
    if report is not None:
        if report.outcome == "failed":
            bounce = Bounce(
                type=report.kind,
                recipients=tuple(r for r in report.recipients if not _is_ours(r, ctx)),
                status=report.status,
                diagnostic=report.diagnostic,
                original_message_ids=report.original_message_ids,
                reason=report.cause,
            )
            return Classification(kind="bounce", reason=report.reason, bounce=bounce)
        label = "delay warning" if report.outcome == "delayed" else "delivery success notice"
        return Classification(kind="notification", reason=f"{label} ({report.reason})")

    # 2. complaint
    complaint = _complaint_signal(msg)
    if complaint is not None:
        return Classification(kind="complaint", reason=complaint)

    # Read receipts are reports too; RFC 8098 makes them Auto-Submitted, so check first.
    if msg.report_type == "disposition-notification" or any(
        n == "disposition" for n, _ in msg.report_fields
    ):
        return Classification(kind="notification", reason="read receipt (disposition-notification)")

    @functools.cache
    def reply_text() -> str:
        # The costliest step of all, and most machine mail never needs it: on first use.
        return extract_reply_text("" if msg.text_from_html else msg.text, msg.html)

    body = msg.text

    # Mail to our unsubscribe address (or Apple Mail's unsubscribe message, which is
    # Auto-Submitted too) is an unsubscribe whatever its auto headers say.
    pattern = _unsubscribe_regex(ctx.unsubscribe_mailto)
    for addr in msg.all_recipients():
        match = pattern.match(addr)
        if match:
            token = match.group(1) if match.groups() else None
            return Classification(
                kind="unsubscribe",
                reason=f"sent to the unsubscribe address {addr}",
                reply_text=reply_text(),
                unsubscribe_token=token,
            )
    if (msg.header("x-apple-unsubscribe") or "").strip().lower() == "true":
        return Classification(
            kind="unsubscribe", reason="X-Apple-Unsubscribe: true", reply_text=reply_text()
        )

    # 3. auto-reply
    signal = (
        _auto_reply_signal(msg)
        or _subject_auto_reply(msg, body)
        or _body_auto_reply(msg, reply_text())
    )
    if signal is not None:
        return Classification(
            kind="auto_reply",
            reason=signal,
            return_date=find_return_date(f"{msg.subject}\n{body[:4000]}", today),
        )

    # 4. notification: other machine mail
    read_subject = re.match(r"(?i)\s*(?:read|gelesen|lu|leído|letto|lido|gelezen)\s*:", msg.subject)
    if read_subject and re.search(
        r"(?i)was\s+read|wurde\s+gelesen|a\s+été\s+lu|fue\s+leído|è\s+stato\s+letto", body
    ):
        return Classification(kind="notification", reason="read receipt (subject)")
    noreply = msg.from_addr and re.match(
        r"(?i)^(?:no[-_.]?reply|do[-_.]?not[-_.]?reply|donotreply)", msg.from_addr
    )
    if noreply and not _threads_to_us(msg, ctx):
        return Classification(kind="notification", reason=f"no-reply sender {msg.from_addr}")

    # 5. unsubscribe (the unsubscribe address was read above)
    # What someone asks for is in the first pages they wrote: bound the intent scans.
    words = new_words(reply_text())[:20_000]
    subject_words = re.sub(r"(?i)^\s*(?:(?:re|aw|sv|antw|fwd?|wg)\s*:\s*)+", "", msg.subject)
    bulk = _bulk_signal(msg)
    list_reply = bulk is not None and _threads_to_us(msg, ctx) and bool(msg.in_reply_to)
    # A newsletter's own "Unsubscribe" link is not a request to us: words count only in
    # mail that is not bulk (or is a reply to us that came through a list).
    if (bulk is None or list_reply) and (
        wants_unsubscribe(words) or wants_unsubscribe(subject_words)
    ):
        return Classification(
            kind="unsubscribe", reason="asks to unsubscribe in words", reply_text=reply_text()
        )

    # 6. bulk
    if bulk is not None and not list_reply:
        return Classification(kind="bulk", reason=bulk)

    # 7. reply
    exclude = frozenset(
        {*ctx.our_addresses, *ctx.internal_domains, *(a for a in [msg.from_addr] if a)}
    )
    intent, referral = detect_intent(words, exclude)
    reason = "human reply" + (f" (through a list: {bulk})" if bulk else "")
    return Classification(
        kind="reply",
        reason=reason,
        reply_text=reply_text(),
        intent=intent,
        referral_email=referral if intent == "referral" else None,
    )
