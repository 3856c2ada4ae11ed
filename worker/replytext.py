"""The new text of a reply, and what it asks for.

`extract_reply_text` drops quoted history (attribution lines such as "On ... wrote:" in
a dozen languages, Outlook header blocks, "-----Original Message-----", `>` quotes after
the new text, HTML quote containers) and signatures (the `-- ` delimiter, rules of `_`
or `-`, "Sent from my iPhone" and its translations). Text written *between* quoted
blocks (an inline answer) is kept, quotes included, because it only reads in context.

`new_words` gives the lines a person wrote in this message (quotes removed), which is
what unsubscribe and intent detection read: our own quoted footer must never count.
Everything here is pure and never raises.
"""

from __future__ import annotations

import re
from typing import Literal

from worker.caseless import Caseless
from worker.parsing import SkipDecision, html_to_text

__all__ = [
    "Intent",
    "detect_intent",
    "extract_reply_text",
    "new_words",
    "quotes_history",
    "wants_unsubscribe",
]

Intent = Literal["positive", "neutral", "negative", "referral"]

# ----------------------------------------------------------------------------- lines

_QUOTE_RE = re.compile(r"^\s*(?:>|[A-Za-z]{1,3}>|\|(?!.*\|\s*$))")
_UNQUOTE_RE = re.compile(r"^(?:\s*(?:>|\|))+ ?")
# Rules that end the written text when more text follows them (a signature or a quote).
_CUT_DELIM_RE = re.compile(
    r"^\s*\*{0,2}(?:--|-- |[-_—–=~+*]{3,}|[_]{2,}|(?:[.·•*]\s?){5,})\*{0,2}\s*$"
)
# Lines of decoration only: dropped when they trail the text. "ᐧ" is the alt text that
# mail-tracking extensions (Streak, Mixmax) leave in plain-text bodies.
_JUNK_RE = re.compile(r"^(?:[\W_]+|ᐧ)$")

_VERBS = (
    r"wrote|writes|schrieb|geschrieben|a\s+écrit|écrit|escribió|escribio|escreveu|"
    r"ha\s+scritto|scrisse|schreef|geschreven|skrev|skriver|napisał\(a\)|napisała|napisał|"
    r"napsal|kirjoitti|írta|пишет|пише|написал[аи]?|написав|写道|寫道|書きました|작성|"
    r"a\s+scris|έγραψε|كتب|napisana|kirjoitti|skrev|писал[аи]?|yazdı|napísal|je\s+napisal|"
    r"napisao(?:\s+je)?|napisala(?:\s+je)?|đã\s+viết|menulis|rašė|va\s+escriure|escriure|"
    r"написа|kirjutas|rakstīja|ezt\s+írta|odesílatel|wrote\s+on"
)
# Chinese, Japanese and Korean verbs follow a name or a time with no space between.
_VERB_RE = re.compile(rf"(?i)(?<!\w)(?:{_VERBS})(?!\w)|写道|寫道|書きました|님이\s*작성|작성")
_STRONG_START_RE = re.compile(
    r"(?i)^(?:on|le|am|el|em|il|op|den|dnia|w\s+dniu|at|quoting|citando|zitat\s+von|"
    r"в|у|在|于|el\s+\w+,|στις|في|wiadomość|pe|den|dne|dňa)(?:\s|,)|^\d"
)
_SENTENCE_END_RE = re.compile(r"(?<![^\W\d_])[^\W\d_]{2,}[.!?]$")
_ATTR_VERB_END_RE = re.compile(r"(?i:wrote|schrieb)$")
# Gmail's date-first attributions: "2016-10-24 15:36 GMT+02:00 Name <a@b>:" and kin.
_DATE_FIRST_RE = re.compile(r"^\d{4}[-/.]\d{1,2}[-/.]\d{1,2}\b.*(?:GMT|@)")

_FIELD_NAMES = (
    r"from|sent|to|cc|bcc|subject|date|reply-to|von|gesendet|an|betreff|datum|kopie|de|"
    r"envoyé|à|a|objet|da|inviato|oggetto|data|risposta|enviado|enviada|para|asunto|fecha|"
    r"assunto|van|verzonden|aan|onderwerp|från|skickat|till|ämne|fra|sendt|til|emne|od|envoye|"
    r"nadawca|adresat|من|تم\s+الإرسال|إلى|الموضوع|от\s+кого|"
    r"wysłano|do|temat|от|отправлено|кому|тема|дата|lähettäjä|lähetetty|vastaanottaja|"
    r"aihe|发件人|发送时间|收件人|主题|寄件者|傳送時間|收件者|主旨|差出人|送信日時|宛先|件名"
)
_FIELD_RE = re.compile(rf"(?i)^\s*+[*_]{{0,2}}\s*+(?:{_FIELD_NAMES})\s*+[*_]{{0,2}}\s*+[:：]")
_FROM_FIELD_RE = re.compile(
    r"(?i)^\s*+[*_]{0,2}\s*+(?:from|von|de|da|van|från|fra|od|от|от\s+кого|nadawca|من|lähettäjä|"
    r"发件人|寄件者|差出人)"
    r"\s*+[*_]{0,2}\s*+[:：]"
)
_ONE_LINE_OUTLOOK_RE = re.compile(r"(?i)^\s*\*?from:.{3,}\b(?:sent|date):")
_SEPARATOR_RE = re.compile(
    r"(?i)^[\s>*]*(?:-{2,}|_{2,})\s*(?:(?:[^-_]|-(?=\w))*?(?:original|message|forward|nachricht|mensaje|"
    r"messaggio|bericht|mensagem|wrote|schrieb|origine|weitergeleitet|réexpédié|transféré|"
    r"reenviado|inoltrato|doorgestuurd|videresendt|vidarebefordrat|wiadomość|сообщение|"
    r"oprindelig|meddelelse|besked|opprinnelig|melding|ursprüngliche|alkuperäinen|viesti|"
    r"oryginalna|původní|zpráva|eredeti|üzenet|originală|mesaj|αρχικό|μήνυμα|исходное|"
    r"пересылаемое|повідомлення|原始邮件|原始郵件|元のメッセージ|orijinal|ileti)"
    r"(?:[^-_]|-(?=\w))*?)\s*(?:-{2,}|_{2,})(?:[\s*]*$|\s*(?=[^\W\d_]{2,20}\s*:))"
)
_FORWARD_INTRO_RE = re.compile(
    r"(?i)^[\s>]*(?:begin\s+forwarded\s+message|anfang\s+der\s+weitergeleiteten\s+nachricht|"
    r"début\s+du\s+message\s+(?:réexpédié|transféré)|inizio\s+messaggio\s+inoltrato|"
    r"mensaje\s+reenviado|forwarded\s+message|weitergeleitete\s+nachricht)\s*[:：]?\s*$"
)
_MOBILE_SIG_RE = Caseless(
    r"^[\s(<]*(?:sent\s+(?:from|with|via|using|by)\b|envoyé\s+(?:de|depuis|avec)\b|"
    r"enviado\s+(?:desde|de|do|con)\b|inviato\s+da\b|verzonden\s+(?:met|vanaf|van)\b|"
    r"verstuurd\s+(?:vanaf|met)\b|sendt\s+fra\b|skickat\s+från\b|lähetetty\b|wysłane\s+z\b|"
    r"von\s+meinem\b|gesendet\s+(?:von|mit)\b|diese\s+nachricht\s+wurde\s+von\b|"
    r"get\s+outlook\s+for\b|отправлено\s+с\b|寄自|從我的|发自我的|来自我的|"
    r"envoyé\s+à\s+partir\s+de\b|verzonden\s+vanuit\b|trimis\s+de\s+pe\b|أُرسلت\s+من|أرسلت\s+من|"
    r"az\s+iphone-omról|(?:obter\s+o|obtener|télécharger|scarica|hämta|pobierz|holen\s+sie\s+sich)"
    r"\s+(?:aplikację\s+)?outlook|outlook\s+(?:für|voor|pour|para|per|för|dla)\s+(?:ios|android)|"
    r"from\s+my\s+(?:iphone|ipad|android|mobile|phone|samsung|galaxy|blackberry|smartphone)"
    r")|(?i:iphone|ipad|android|mobile|handy|smartphone).{0,30}(?:gesendet|傳送|发送)\W*$"
)


_BIDI = "\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200b"


def _is_mobile_signature(line: str) -> bool:
    """A "Sent from my iPhone" line in one of its languages, not a sentence that starts so."""
    text = line.strip().strip(_BIDI).strip()
    if len(text) >= 120 or not _MOBILE_SIG_RE.search(text):
        return False
    # "Sent from my desk, is much easier than my phone." is a person writing.
    return "," not in text or bool(_DEVICE_RE.search(text.split(",", 1)[0]))


_DEVICE_RE = re.compile(r"(?i)iphone|ipad|android|outlook|mobile|samsung|galaxy|blackberry|phone")
# Leading banners that mail gateways put above the text ("CAUTION: This email originated
# from outside the organization", "[EXTERNAL]").
_BANNER_RE = re.compile(
    r"(?i)^\s*(?:\[?(?:caution|warning|external|attention|notice)\]?\s*[:!-]?.{0,300}?"
    r"(?:external|outside\s+(?:of\s+)?(?:the|your|our)\s+organi[sz]ation|originated\s+outside)|"
    r"\[external\]).{0,400}$"
)


def _unquote(line: str) -> str:
    text = _UNQUOTE_RE.sub("", line).strip()
    if text and (text[0] in _BIDI or text[-1] in _BIDI):  # RTL clients wrap lines in marks
        text = _UNQUOTE_RE.sub("", text.strip(_BIDI)).strip().strip(_BIDI).strip()
    return text


def _ends_like_attribution(text: str) -> bool:
    """Whether `text` (one line, unquoted) ends as an attribution does: with a colon, or
    with "wrote" or "schrieb" and then spaces and dashes. It tests the end of the line
    only, where a search for the same ending would try every position of it."""
    if text.endswith((":", "：")):
        return True
    tail = text.rstrip("-").rstrip()
    # Only these four letters end "wrote" or "schrieb", ignoring case: most lines stop here.
    return tail[-1:] in ("e", "E", "b", "B") and bool(_ATTR_VERB_END_RE.search(tail[-7:]))


def _is_attribution(parts: list[str]) -> bool:
    """Whether these unquoted lines, read as one, are an attribution ("On <date>, X wrote:")."""
    joined = " ".join(p for p in parts if p)
    if not joined or len(joined) > 400 or not _ends_like_attribution(joined):
        return False
    for part in parts[:-1]:
        if _SENTENCE_END_RE.search(part):
            return False
    has_hint = bool(re.search(r"\d|@", joined)) or bool(_STRONG_START_RE.match(parts[0]))
    if _VERB_RE.search(joined) and has_hint:
        return True
    # "Thu, 26 Jun 2014 14:00 +0400, Name <a@b>:" with no verb at all
    return bool(re.search(r"(?:>|@\S+)\s*[:：]$", joined) and re.search(r"\d{1,2}:\d{2}", joined))


def _header_spans(lines: list[str]) -> dict[int, int]:
    """Start index -> end index (exclusive) of every quoted-history header in `lines`."""
    unquoted = [_unquote(line) for line in lines]  # every test below reads these
    spans: dict[int, int] = {}
    n = len(lines)
    covered = -1
    for end in range(n):
        if end <= covered or not lines[end].strip():
            continue
        # Every window tried below ends with this line, and an attribution ends so:
        # one test here spares six joins and regex runs per line.
        if not _ends_like_attribution(unquoted[end]):
            continue
        found_start = None
        for size in range(1, 7):
            start = end - size + 1
            if start < 0 or start <= covered:
                break
            if not lines[start].strip():
                continue
            if _is_attribution(unquoted[start : end + 1]):
                found_start = start
                break
        if found_start is None:
            continue
        # Extend upwards to where a wrapped attribution really begins ("Le 4 janv.,\n<a@b>\na écrit :").
        probe = found_start - 1
        while probe > covered and end - probe < 6:
            text = unquoted[probe]
            if text and _SENTENCE_END_RE.search(text):
                break
            if (
                text
                and _STRONG_START_RE.match(text)
                and re.search(r"\d|@", text)  # "Le 4 janv.," - not "Il est signalé ..."
                and _is_attribution(unquoted[probe : end + 1])
            ):
                found_start = probe
            probe -= 1
        spans[found_start] = end + 1
        covered = end
    inside = [False] * n  # lines within an attribution found above: one pass, not per line
    for start, stop in spans.items():
        for k in range(start, stop):
            inside[k] = True
    for i, line in enumerate(lines):
        if inside[i]:
            continue
        text = line.strip()
        if not text:
            continue
        if _DATE_FIRST_RE.match(unquoted[i]) and len(text) < 200:
            spans.setdefault(i, i + 1)
        elif _SEPARATOR_RE.match(line) or _FORWARD_INTRO_RE.match(line):
            end = i + 1
            nxt = end
            while nxt < len(lines) and not lines[nxt].strip():
                nxt += 1
            if nxt < len(lines) and _FIELD_RE.match(unquoted[nxt]):
                end = _block_end(unquoted, nxt)
            spans.setdefault(i, end)
        elif ":" not in unquoted[i] and "：" not in unquoted[i]:
            continue  # both header tests below need a colon
        elif _ONE_LINE_OUTLOOK_RE.match(unquoted[i]):
            spans.setdefault(i, _block_end(unquoted, i))
        elif _FIELD_RE.match(unquoted[i]) and (i == 0 or not _FIELD_RE.match(unquoted[i - 1])):
            end = _block_end(unquoted, i)
            block = unquoted[i:end]
            fields = [b for b in block if _FIELD_RE.match(b)]
            if len(fields) >= 2 and any(_FROM_FIELD_RE.match(b) for b in block):
                spans.setdefault(i, end)
    # "Am 20.06.24 um 16:20 schrieb X" without its colon, right above a header block.
    for start in list(spans):
        prev = start - 1
        while prev >= 0 and not lines[prev].strip():
            prev -= 1
        if prev < 0 or prev in spans or start - prev > 2:
            continue
        text = unquoted[prev]
        if (
            len(text) < 300
            and _STRONG_START_RE.match(text)
            and _VERB_RE.search(text)
            and re.search(r"\d", text)
        ):
            spans[prev] = spans.pop(start)
    return dict(sorted(spans.items()))


def _block_end(unquoted: list[str], start: int) -> int:
    """End of a run of non-empty lines (an Outlook header block with its wrapped values)."""
    end = start
    while end < len(unquoted) and unquoted[end] and end - start < 12:
        end += 1
    return end


def _next_filled(lines: list[str], i: int) -> int:
    while i < len(lines) and not lines[i].strip():
        i += 1
    return i


# Closings on a line of their own, per language (what precedes the writer's name).
_SIGNOFF_RE = re.compile(
    r"(?i)^[\s*_]*(?:(?:best|kind|warm|warmest|many|with\s+best)\s+(?:regards|wishes)|regards|best|"
    r"all\s+the\s+best|cheers|thanks(?:\s+again|\s+a\s+lot)?|thank\s+you|many\s+thanks|"
    r"(?:yours\s+)?(?:sincerely|truly|faithfully)(?:\s+yours)?|respectfully|take\s+care|"
    r"mit\s+freundlichen\s+gr[üu](?:ß|ss)en|freundliche\s+gr[üu](?:ß|ss)e|(?:viele|beste|liebe|"
    r"herzliche|schöne)\s+gr[üu](?:ß|ss)e|gru(?:ß|ss)|gr[üu](?:ß|ss)e|lg|vg|mfg|danke|vielen\s+dank|"
    r"(?:bien\s+)?cordialement|bien\s+à\s+vous|(?:meilleures\s+)?salutations|merci|au\s+revoir|"
    r"amicalement|(?:un\s+)?saludos?(?:\s+cordiales)?|atentamente|cordialmente|(?:muchas\s+)?gracias|"
    r"(?:cordiali|distinti)\s+saluti|saluti|grazie|(?:melhores\s+)?cumprimentos|atenciosamente|"
    r"obrigad[oa]|abraços?|met\s+vriendelijke\s+groet(?:en)?|vriendelijke\s+groet(?:en)?|groeten|"
    r"mvg|bedankt|med\s+venlig\s+hilsen|venlig\s+hilsen|(?:med\s+)?vennlig\s+hilsen|"
    r"(?:med\s+)?vänliga\s+hälsningar|hälsningar|hilsen|mvh|kh|ystävällisin\s+terveisin|terveisin|"
    r"(?:serdecznie\s+)?pozdrawiam|z\s+powa[żz]aniem|s\s+pozdravem|üdvözlettel|tisztelettel|"
    r"cu\s+(?:stimă|respect)|с\s+уважением|з\s+повагою|με\s+εκτίμηση|saygılarımla|مع\s+التحية)"
    r"[\s,.!]*$"
)
# The writer's name under a closing: a few capitalised words, no sentence.
_NAME_RE = re.compile(r"^[\s*_]*[^\W\d_][\w.'’-]*(?:\s+[\w.'’-]+){0,3}[\s*_]*$")
_DASH_NAME_RE = re.compile(r"^(?:-{1,2}|/)\s?[A-ZÀ-ÞĀ-Ž][\w.'’-]*(?:\s+[^\W\d_][\w.'’-]*){0,2}\s*$")


def _is_title(line: str) -> bool:
    text = line.strip()
    return 0 < len(text) <= 60 and not _SENTENCE_END_RE.search(text) and "@" not in text


# A device line the sender's client adds under the text ("Wysłane z iPhone'a",
# "iPhoneから送信", "Saadetud minu iPhone'ist"): a short line naming a device, read only
# as the last line of the text, so a sentence about a phone elsewhere is never cut.
_DEVICE_LINE_RE = re.compile(
    r"(?i)^\W*(?:[^\s]+\s+){0,5}?[^\s]*(?:iphon|ipad|android|blackberry|galaxy|samsung|huawei|"
    r"xiaomi|pixel|outlook\s+(?:for|pour|für|para|voor|per|för|dla)\s+\w+)[^\s]*(?:\s+[^\s]+){0,4}?\W*$"
)


def _is_device_line(line: str) -> bool:
    text = line.strip().strip(_BIDI).strip()
    return 0 < len(text) <= 60 and len(text.split()) <= 7 and bool(_DEVICE_LINE_RE.match(text))


def _cut_at_signoff(lines: list[str], strip_signoff: bool) -> list[str]:
    """End the text at the closing and the name under it; without them if `strip_signoff`.

    What follows "Kind regards,\nEva" is a signature, a disclaimer or a footer. A closing
    counts only after some text, and only when a short name (or nothing) follows it.
    """
    seen = False
    for i, line in enumerate(lines):
        text = line.strip()
        if not text or _QUOTE_RE.match(line):
            continue
        if seen and _SIGNOFF_RE.match(text):
            k = _next_filled(lines, i + 1)
            if k >= len(lines):
                return lines[:i] if strip_signoff else lines
            name = lines[k].strip()
            if _NAME_RE.match(name) and len(name) <= 40 and not _SIGNOFF_RE.match(name):
                if strip_signoff:
                    return lines[:i]
                end = k + 1  # the lines right under the name: a title, a company
                while end < len(lines) and end - k <= 3 and _is_title(lines[end]):
                    end += 1
                return lines[:end]
        seen = True
    if strip_signoff:
        last = len(lines) - 1
        while last >= 0 and not lines[last].strip():
            last -= 1
        prev = last - 1
        while prev >= 0 and not lines[prev].strip():
            prev -= 1
        bullet = prev >= 0 and lines[prev].lstrip().startswith(("-", "/"))
        if last > 0 and _DASH_NAME_RE.match(lines[last]) and not bullet:
            return lines[:last]
    return lines


def _trim_lines(lines: list[str], strip_signature: bool, strip_signoff: bool = False) -> list[str]:
    n = len(lines)
    spans = _header_spans(lines)
    is_quote = [bool(_QUOTE_RE.match(line)) for line in lines]
    drop = [False] * n

    def quote_run_end(i: int) -> int:
        while i < n and (is_quote[i] or not lines[i].strip()) and i not in spans:
            i += 1
        return i

    def text_at(i: int) -> bool:
        return i < n and i not in spans and not is_quote[i] and not _CUT_DELIM_RE.match(lines[i])

    i = _next_filled(lines, 0)
    # A gateway's banner or a "Sent from my iPhone" above the text is not the text.
    while i < n and (
        _BANNER_RE.match(lines[i]) or (strip_signature and _is_mobile_signature(lines[i]))
    ):
        if _next_filled(lines, i + 1) >= n:
            break
        drop[i] = True
        i = _next_filled(lines, i + 1)
    # A message that opens with a header is a bottom-posted reply (or a forward): drop the
    # header, and the quote right under it when the new text follows that quote.
    if i in spans:
        end = spans[i]
        for k in range(i, end):
            drop[k] = True
        k = _next_filled(lines, end)
        if k < n and is_quote[k] and k not in spans:
            q_end = quote_run_end(k)
            t = _next_filled(lines, q_end)
            if t >= n or text_at(t):
                for m in range(k, q_end):
                    drop[m] = True
        i = end

    cut = n
    seen_text = any(not drop[k] and lines[k].strip() and not is_quote[k] for k in range(i))
    j = i
    while j < n:
        if drop[j]:
            j += 1
            continue
        line = lines[j]
        if j in spans:
            end = spans[j]
            k = _next_filled(lines, end)
            if k < n and is_quote[k] and k not in spans:
                t = _next_filled(lines, quote_run_end(k))
                if text_at(t):
                    # An inline answer follows the quote: keep the quote, lose the header.
                    for m in range(j, end):
                        drop[m] = True
                    j = end
                    continue
            cut = j
            break
        if line.strip() and not is_quote[j]:
            if _CUT_DELIM_RE.match(line):
                k = _next_filled(lines, j + 1)
                signature = (
                    strip_signature and seen_text and k < n and not _JUNK_RE.match(lines[k].strip())
                )
                if signature or k in spans:
                    cut = j
                    break
            elif strip_signature and seen_text and _is_mobile_signature(line):
                cut = j
                break
            else:
                seen_text = True
        j += 1

    kept = [lines[k] for k in range(cut) if not drop[k]]
    # Trailing quotes and decoration are history or signature rules, not new text.
    trimmed = list(kept)
    while trimmed and (
        not trimmed[-1].strip()
        or _QUOTE_RE.match(trimmed[-1])
        or _JUNK_RE.match(trimmed[-1].strip())
    ):
        trimmed.pop()
    if not any(line.strip() for line in trimmed) and not any(drop):
        # Nothing but a quote (someone forwarding our text back): that quote is the message.
        trimmed = kept
        while trimmed and not trimmed[-1].strip():
            trimmed.pop()
    elif strip_signature:
        filled = [k for k, line in enumerate(trimmed) if line.strip()]
        if len(filled) > 1 and _is_device_line(trimmed[filled[-1]]):
            trimmed = trimmed[: filled[-1]]
        trimmed = _cut_at_signoff(trimmed, strip_signoff)
        while trimmed and not trimmed[-1].strip():
            trimmed.pop()
    return trimmed


# ----------------------------------------------------------------------------- HTML


_HTML_SKIP_CLASSES = (
    "gmail_quote",
    "yahoo_quoted",
    "protonmail_quote",
    "zmail_extra",
    "moz-cite-prefix",
    "gmail_signature",
    "x_gmail_quote",
    "moz-forward-container",
)
_HTML_STOP_IDS = (
    "divrplyfwdmsg",
    "appendonsend",
    "mail-editor-reference-message-container",
    "stopspelling",
    "x_divrplyfwdmsg",
    "x_appendonsend",
)


def _html_quote_hook(tag: str, attrs: dict[str, str]) -> SkipDecision:
    """Which HTML elements hold quoted history in the common clients."""
    classes = attrs.get("class", "").lower()
    ident = attrs.get("id", "").lower()
    style = attrs.get("style", "").lower().replace(" ", "")
    if ident in _HTML_STOP_IDS or "outlookmessageheader" in classes:
        return "stop"
    if tag == "div" and "border-top:solid#" in style and ("#b5c4df" in style or "#e1e1e1" in style):
        return "stop"  # Outlook desktop: the rule above "From: ... Sent: ..."
    if any(c in classes for c in _HTML_SKIP_CLASSES):
        return "skip"
    if tag == "blockquote" and (attrs.get("type", "").lower() == "cite" or "border-left" in style):
        return "skip"
    return None


# ----------------------------------------------------------------------------- public


def extract_reply_text(
    text: str, html: str = "", *, strip_signature: bool = True, strip_signoff: bool = False
) -> str:
    """The new text of a reply: without quoted history and (by default) signature.

    `text` is the plain-text body; when it is empty, `html` is used with the quote
    containers of Gmail, Apple Mail, Thunderbird and Outlook removed first. Inline
    answers between quotes are kept together with the quotes they answer. With
    `strip_signature=False` only quoted history is removed (mobile "Sent from" lines and
    `-- ` signatures stay). By default the text ends with the closing and the name under
    it ("Kind regards,\nEva"); `strip_signoff=True` removes those too. Returns "" when
    nothing new was written. Never raises.
    """
    try:
        if not text.strip() and html.strip():
            text = html_to_text(html, _html_quote_hook)
        lines = text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "").split("\n")
        if len(lines) > 20_000:  # nobody writes that much new text; bound the work
            lines = lines[:20_000]
        trimmed = _trim_lines(lines, strip_signature, strip_signoff)
        return "\n".join(trimmed).strip("\n").rstrip()
    except Exception:  # a reply's text is best effort; never lose the message
        return text.strip()


def quotes_history(text: str) -> bool:
    """Whether `text` holds a quoted earlier message (an attribution or a header block)."""
    try:
        return bool(_header_spans(text.replace("\r\n", "\n").split("\n")[:2000]))
    except Exception:
        return False


def new_words(reply_text: str) -> str:
    """The lines of `reply_text` that the sender wrote now: quotes removed."""
    return "\n".join(line for line in reply_text.split("\n") if not _QUOTE_RE.match(line))


# ----------------------------------------------------------------------------- intent

# Read only as "anywhere in the text or not", so the order of the words is free: those that
# start a word share one `\b`, which a position inside a word fails at once (each `\b` of
# its own was tried at every position, word by word).
_UNSUBSCRIBE_RE = Caseless(
    r"\b(?:unsubscribe\b|remove\s+(?:me|us|my\s+(?:e-?mail|address))\b|"
    r"take\s+(?:me|us)\s+off\b|opt(?:\s|-)?(?:me\s+)?out\b|"
    r"stop\s+(?:e-?mailing|sending|contacting|writing)\b|"
    r"(?:don'?t|do\s+not|never)\s+(?:e-?mail|send)\s+(?:me|us)\b|"
    r"no\s+more\s+e-?mails\b|abmelden\b|abbestellen\b|austragen\b|"
    r"keine\s+(?:weiteren\s+)?(?:e-?mails|nachrichten|newsletter)\b|"
    r"ne\s+plus\s+recevoir\b|retirez[- ]moi\b|"
    r"dar(?:me|se)?\s+de\s+baja\b|no\s+(?:quiero|deseo)\s+recibir\b|"
    r"cancella(?:re)?\s+(?:la\s+mia\s+)?iscrizione\b|"
    r"disiscriv|non\s+voglio\s+(?:più\s+)?ricevere\b|descadastr|"
    r"n[aã]o\s+quero\s+(?:mais\s+)?receber\b|"
    r"uitschrijven\b|afmelden\b|schrijf\s+me\s+uit\b)|"
    # anywhere in a word
    r"d[ée]sabonner|d[ée]sinscri|cancelar\s+(?:la\s+)?suscripci[oó]n|"
    r"cancelar\s+(?:a\s+)?inscri[cç][aã]o|"
    # a line of its own
    r"^[^\S\n]*stop[^\S\n]*[.!]?[^\S\n]*$",
    re.MULTILINE,
)

_NEGATIVE_RE = Caseless(
    r"\bnot\s+(?:really\s+|currently\s+|at\s+all\s+)?interested\b|\bno\s+interest\b|"
    r"\bno,?\s+thank(?:s|\s+you)\b|\bnot\s+(?:a\s+(?:good\s+)?fit|for\s+us|relevant)\b|"
    r"\b(?:please\s+)?(?:don'?t|do\s+not)\s+(?:contact|call|email|e-mail|reach\s+out)\b|"
    r"\bwe(?:'re|\s+are)\s+(?:all\s+set|good|covered)\b|\balready\s+(?:have|use|using|work\s+with)\b|"
    r"\bnot\s+(?:looking|in\s+the\s+market)\b|\bno\s+need\b|\bnot\s+at\s+this\s+time\b|"
    r"\bkein(?:e|en)?\s+(?:interesse|bedarf)\b|\bnicht\s+interessiert\b|"
    r"\bpas\s+(?:du\s+tout\s+)?intéressée?s?\b|\bn'?(?:est|sommes|suis)\s+pas\s+intéressée?s?\b|"
    r"\bnon\s+merci\b|\bpas\s+besoin\b|"
    r"\bno\s+(?:estoy|estamos)\s+interesad[oa]s?\b|\bno\s+(?:nos|me)\s+interesa\b|"
    r"\bno,?\s+gracias\b|\bnon\s+(?:sono|siamo)\s+interessat[oaie]\b|"
    r"\bnon\s+(?:ci|mi)\s+interessa\b|\bno,?\s+grazie\b|"
    r"\bn[aã]o\s+(?:tenho|temos)\s+interesse\b|\bn[aã]o\s+(?:estou|estamos)\s+interessad[oa]s?\b|"
    r"\bn[aã]o,?\s+obrigad[oa]\b|\bgeen\s+interesse\b|\bniet\s+geïnteresseerd\b|\bnee,?\s+bedankt\b"
)

_REFERRAL_RE = Caseless(
    r"\bnot\s+the\s+(?:right|best|correct|appropriate)\s+(?:person|contact|one)\b|"
    r"\bwrong\s+(?:person|contact)\b|\bis\s+the\s+(?:right|best|correct)\s+(?:person|contact)\b|"
    r"\b(?:talk|speak)\s+(?:to|with)\s+(?:my\s+)?(?:colleague|coworker|co-worker|boss|manager|"
    r"team|\w+\s+in\s+\w+)\b|\b(?:contact|reach\s+out\s+to|get\s+in\s+touch\s+with|email|"
    r"write\s+to)\s+(?:my\s+)?(?:colleague|coworker|co-worker|boss|manager|our\s+\w+\s+team)\b|"
    r"\b(?:i'?ve|i\s+have)\s+(?:forwarded|passed)\b|\b(?:cc'?(?:ed|ing)|copying|looping\s+in)\b|"
    r"\bin\s+charge\s+of\b|\bresponsible\s+for\b|\bno\s+longer\s+(?:with|at|works?)\b|"
    r"\bnicht\s+(?:der|die)\s+richtige\s+ansprechp|\bwenden\s+sie\s+sich\s+an\b|"
    r"\bmeine[nrm]?\s+kolleg|\bzuständig\b|"
    r"\bpas\s+la\s+bonne\s+personne\b|\bmon\s+coll[eè]gue\b|\bma\s+coll[eè]gue\b|"
    r"\bno\s+soy\s+la\s+persona\b|\bmi\s+(?:colega|compañer[oa])\b|"
    r"\bnon\s+sono\s+la\s+persona\b|\bil\s+mio\s+collega\b|\bla\s+mia\s+collega\b|"
    r"\bn[aã]o\s+sou\s+a\s+pessoa\b|\bmeu\s+colega\b|\bminha\s+colega\b|"
    r"\bniet\s+de\s+juiste\s+persoon\b|\bmijn\s+collega\b"
)

_POSITIVE_RE = Caseless(
    r"\binterested\b|\bpric(?:e|es|ing)\b|\bquote\b|\bdemo\b|\btrial\b|\bbudget\b|"
    r"\b(?:a|quick|short|phone|video|intro)\s+call\b|\bcall\s+(?:me|us)\b|\bmeeting\b|\bmeet\b|"
    r"\blet'?s\s+(?:talk|chat|connect|meet|discuss)\b|\btell\s+me\s+more\b|\bmore\s+(?:info|information|details)\b|"
    r"\bsend\s+(?:me|us)\b|\bschedule\b|\bbook\s+a\b|\bavailable\s+(?:on|next|this|tomorrow)\b|"
    r"\bsounds\s+(?:good|great|interesting)\b|\b(?:works|suits)\s+(?:for\s+)?(?:me|us)\b|"
    r"\b(?:monday|tuesday|wednesday|thursday|friday|tomorrow)\s+(?:works|is\s+fine|suits)\b|\bhow\s+much\b|\bcost\b|\bproposal\b|"
    r"\binteressiert\b|\bpreis|\bangebot\b|\btermin\b|\bgespräch\b|\bkosten\b|"
    r"\bintéressée?s?\b|\btarifs?\b|\bprix\b|\bdevis\b|\brendez-vous\b|\bdémo\b|\bappel\b|"
    r"\binteresad[oa]s?\b|\bprecios?\b|\bcotizaci[oó]n\b|\bdemostraci[oó]n\b|\bllamada\b|\breuni[oó]n\b|"
    r"\binteressat[oaie]\b|\bprezz[oi]\b|\bpreventivo\b|\bchiamata\b|\briunione\b|"
    r"\binteressad[oa]s?\b|\bpreços?\b|\borçamento\b|\breuni[aã]o\b|\bligação\b|"
    r"\bgeïnteresseerd\b|\bprijs\b|\bofferte\b|\bafspraak\b|\bgesprek\b"
)

# Beside an address, words that send us to it.
_ASKS_TO_CONTACT_RE = Caseless(
    r"\b(?:contact|reach|talk|speak|write|email|e-mail|ask|kontaktieren|contactez|"
    r"contacte|contatta|contacteer|neem\s+contact|schreiben\s+sie)\b"
)
_EMAIL_RE = re.compile(r"(?<![\w.+'-])[\w.+'-]+@[\w-]+(?:\.[\w-]+)+")


def wants_unsubscribe(words: str) -> bool:
    """Whether these words (new text or subject) ask to stop receiving mail."""
    return bool(_UNSUBSCRIBE_RE.search(words))


def detect_intent(words: str, exclude: frozenset[str] = frozenset()) -> tuple[Intent, str | None]:
    """The intent of a reply's new words, and a referred colleague's address if given.

    Referral wins (someone else should be contacted), then negative (a clear no), then
    positive (buying signals), else neutral. Addresses in `exclude` (the sender, our own
    addresses) are never reported as the referral.
    """
    emails = [e.lower().rstrip(".") for e in _EMAIL_RE.findall(words)]
    others = [e for e in emails if e not in exclude and e.split("@", 1)[-1] not in exclude]
    referral_email = others[0] if others else None
    if _REFERRAL_RE.search(words):
        return "referral", referral_email
    if referral_email and _ASKS_TO_CONTACT_RE.search(words):
        return "referral", referral_email
    if _NEGATIVE_RE.search(words):
        return "negative", None
    if _POSITIVE_RE.search(words):
        return "positive", None
    return "neutral", None
