"""`twoway report`: the funnel and recent activity as one self-contained HTML page.

The page needs nothing but a browser: no external fonts, scripts or images. Charts are
inline SVG (with a native tooltip per bar and a table of the numbers behind a
`<details>`), styles are inline CSS, so the file can be mailed, attached to a ticket or
opened from a file share as it is. The funnel, lead counts, outbox, mailbox health and
alarms come from `collect_status` — the very numbers `twoway status --json` prints —
and the daily series from one aggregate query each.

Days are UTC calendar days, like every timestamp twoway stores.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from html import escape
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import QueryableAttribute, Session
from sqlalchemy.sql import ColumnElement

from worker import __version__
from worker.app import App
from worker.models import InboundMessage, LeadEvent, LeadStatus, OutboundMessage, OutboxState
from worker.status import collect_status

SEND_KINDS = ("nurture", "handoff", "followup")

# The Okabe–Ito palette, told apart with every common colour-vision deficiency; its yellow
# and reddish purple darkened so that each colour keeps at least 3:1 contrast against the
# white page (WCAG 1.4.11 for graphics). Labels and tooltips never rely on colour alone.
COLOURS = {
    "nurture": "#0072B2",
    "handoff": "#D55E00",
    "followup": "#A87400",
    "replies": "#009E73",
    "promotions": "#AA4499",
}
SERIES_LABELS = {
    "nurture": "Nurture",
    "handoff": "Handoff to rep",
    "followup": "Follow-up to prospect",
    "replies": "Genuine replies",
    "promotions": "Promotions to prospect",
}
# One hue, dark to light, for the stages of the funnel: the order carries the meaning.
FUNNEL_COLOURS = ("#08306B", "#08519C", "#2171B5", "#4292C6")
STATUS_NOTES = {
    "lead": "receiving nurture emails",
    "held": "replied; waits for a person (below the minimum fit)",
    "prospect": "replied; handed to a rep",
    "unsubscribed": "asked to stop",
    "bounced": "address undeliverable",
    "disqualified": "not interested, or by hand",
    "customer": "marked by a rep",
}
OUTBOX_NOTES = {
    "queued": "waiting for its time, window or cap",
    "sending": "handed to SMTP right now",
    "sent": "accepted by the SMTP server",
    "failed": "permanent error; not retried",
    "cancelled": "no longer needed (lead replied, stopped)",
    "unknown": "worker stopped during the SMTP call",
}


@dataclass(frozen=True)
class Activity:
    """Counts per UTC day over a window, oldest day first.

    Every list in `sends` (one per kind in SEND_KINDS), `replies` and `promotions` has one
    entry per day in `days`; the last day is today.
    """

    days: tuple[date, ...]
    sends: dict[str, list[int]]
    replies: list[int]
    promotions: list[int]

    @property
    def sent_per_day(self) -> list[int]:
        return [sum(col) for col in zip(*self.sends.values(), strict=True)]

    @property
    def is_empty(self) -> bool:
        return not any(self.sent_per_day) and not any(self.replies) and not any(self.promotions)


def collect_activity(app: App, days: int) -> Activity:
    """Sends (sent messages by `sent_at`, per kind), genuine replies (by `received_at`) and
    promotions (`promoted` events by `at`) for each of the last `days` UTC days, today
    included. Only reads."""
    if days < 1:
        raise ValueError("days must be at least 1")
    today = app.now().astimezone(UTC).date()
    first = today - timedelta(days=days - 1)
    since = datetime.combine(first, datetime.min.time(), UTC)
    until = datetime.combine(today + timedelta(days=1), datetime.min.time(), UTC)
    span = tuple(first + timedelta(days=i) for i in range(days))
    index = {d: i for i, d in enumerate(span)}

    def series(counts: Iterable[tuple[date, int]]) -> list[int]:
        out = [0] * days
        for d, n in counts:
            if d in index:
                out[index[d]] += n
        return out

    with app.transaction() as s:
        by_kind = _per_day(
            s,
            OutboundMessage.sent_at,
            since,
            until,
            OutboundMessage.status == OutboxState.SENT,
            group=OutboundMessage.kind,
        )
        replies = _per_day(
            s, InboundMessage.received_at, since, until, InboundMessage.kind == "reply"
        )
        promotions = _per_day(s, LeadEvent.at, since, until, LeadEvent.type == "promoted")
    sends = {kind: series((d, n) for k, d, n in by_kind if k == kind) for kind in SEND_KINDS}
    return Activity(
        days=span,
        sends=sends,
        replies=series((d, n) for _, d, n in replies),
        promotions=series((d, n) for _, d, n in promotions),
    )


def _per_day(
    s: Session,
    at: QueryableAttribute[Any],
    since: datetime,
    until: datetime,
    *where: ColumnElement[bool],
    group: QueryableAttribute[Any] | None = None,
) -> list[tuple[str, date, int]]:
    """(group value or "", UTC day, count) for rows with `since <= at < until`.

    Grouping by day happens in the database so a busy month stays one small result;
    `date()` exists in SQLite and PostgreSQL and works on the naive UTC we store.
    """
    day = func.date(at)
    cols: list[Any] = [day, func.count()]
    keys: list[Any] = [day]
    if group is not None:
        cols.insert(0, group)
        keys.insert(0, group)
    q = select(*cols).where(at >= since, at < until, *where).group_by(*keys)
    rows = []
    for row in s.execute(q):
        g, d, n = (row[0], row[1], row[2]) if group is not None else ("", row[0], row[1])
        rows.append((str(g), _as_date(d), int(n)))
    return rows


def _as_date(value: object) -> date:
    # PostgreSQL hands back a date, SQLite the text 'YYYY-MM-DD'.
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    return date.fromisoformat(str(value)[:10])


def build_report(app: App, days: int = 30) -> str:
    """The whole report as one HTML document (UTF-8 text, no external resources).

    Shows, as of `app.now()`: the funnel per campaign with conversion rates, a daily chart
    of sends, replies and promotions over the last `days` UTC days (today included), and
    tables of leads by status, outbox and mailbox health and alarms. An empty database
    gives the same page with a friendly "nothing yet" in place of each chart. Only reads;
    raises ValueError when `days` < 1.
    """
    activity = collect_activity(app, days)
    status = collect_status(app)
    now = app.now().astimezone(UTC)
    owner = app.config.sender.display_name or app.config.sender.address
    return _page(status, activity, now, owner)


# --- the page ----------------------------------------------------------------------------


def _page(status: dict[str, Any], act: Activity, now: datetime, owner: str) -> str:
    days = len(act.days)
    period = f"{_day(act.days[0])} – {_day(act.days[-1])}"
    body = "\n".join(
        [
            '<header class="top">',
            '<p class="brand">twoway · funnel report</p>',
            f"<h1>{escape(owner)}</h1>",
            f'<p class="meta">As of {escape(_when(now))} · activity over the last {days} '
            f"day{'s' if days != 1 else ''} ({escape(period)}, UTC days)</p>",
            "</header>",
            _banner(status["alarms"]),
            _kpis(status, act),
            _section(
                "Funnel",
                "From enrolled lead to a prospect in a rep's hands, per campaign.",
                _funnels(status["funnel"]),
            ),
            _section(
                "Speed to lead",
                "How fast each rep answers a new prospect (the last "
                f"{(status.get('speed_to_lead') or {}).get('days', 30)} days), and who is "
                "still waiting for a first answer, oldest first.",
                _speed(status.get("speed_to_lead") or {}),
            ),
            _section(
                "Daily activity",
                "Emails sent by kind, and the genuine replies and promotions they brought.",
                _activity(act),
            ),
            '<div class="grid">',
            _card("Leads by status", _lead_table(status["leads"])),
            _card("Outbox", _outbox_table(status)),
            _card("Mailboxes", _mailbox_table(status)),
            _card("Alarms", _alarms(status), anchor="alarms"),
            "</div>",
            f"<footer>Generated by twoway {escape(__version__)} on {escape(_when(now))}. "
            "The counts are those of <code>twoway status --json</code>.</footer>",
        ]
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>twoway report — {escape(owner)} — {escape(now.date().isoformat())}</title>\n"
        f"<style>{CSS}</style>\n</head>\n<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n"
    )


CSS = """
:root { --ink: #1b2430; --muted: #5b6675; --line: #e3e7ed; --bg: #f5f7fa; --card: #fff;
  --ok: #0a7d4f; --warn: #9a5b00; --bad: #b3261e; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1140px; margin: 0 auto; padding: 28px 24px 40px; }
h1 { font-size: 28px; line-height: 1.2; margin: 2px 0 4px; letter-spacing: -0.01em; }
h2 { font-size: 19px; margin: 0 0 2px; }
h3 { font-size: 15px; margin: 0 0 10px; }
code { font: 13px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  background: #eef1f5; padding: 1px 5px; border-radius: 4px; }
.brand { margin: 0; color: var(--muted); font-size: 13px; font-weight: 600;
  letter-spacing: 0.06em; text-transform: uppercase; }
.meta, .lede { color: var(--muted); margin: 0; }
.top { margin-bottom: 20px; }
.kpis { display: grid; grid-template-columns: repeat(auto-fit, minmax(150px, 1fr)); gap: 12px;
  margin-bottom: 20px; }
.kpi { background: var(--card); border: 1px solid var(--line); border-radius: 10px;
  padding: 12px 16px; }
.kpi b { display: block; font-size: 28px; line-height: 1.15; font-variant-numeric: tabular-nums; }
.kpi span { color: var(--muted); font-size: 13px; }
section, .card { background: var(--card); border: 1px solid var(--line); border-radius: 12px;
  padding: 20px 22px; margin-bottom: 20px; }
section > .lede { margin-bottom: 14px; }
.campaign + .campaign { border-top: 1px solid var(--line); margin-top: 14px; padding-top: 14px; }
.campaign h3 span { color: var(--muted); font-weight: 400; }
svg { display: block; width: 100%; height: auto; }
svg text { font-family: inherit; fill: var(--ink); }
.grid { display: grid; grid-template-columns: 1fr 1fr; gap: 20px; }
.grid .card { margin: 0; }
@media (max-width: 800px) { .grid { grid-template-columns: 1fr; } }
table { width: 100%; border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: 6px 8px; border-bottom: 1px solid var(--line);
  vertical-align: top; }
th { font-size: 12px; text-transform: uppercase; letter-spacing: 0.05em; color: var(--muted);
  font-weight: 600; }
td.n, th.n { text-align: right; }
td small { color: var(--muted); display: block; font-size: 12.5px; }
tr:last-child td { border-bottom: 0; }
.share { width: 30%; }
.bar { height: 8px; border-radius: 4px; background: #2171B5; min-width: 2px; margin-top: 7px; }
.bar.zero { background: transparent; }
.legend { display: flex; flex-wrap: wrap; gap: 6px 20px; margin: 0 0 8px; padding: 0;
  list-style: none; font-size: 14px; }
.legend i { display: inline-block; width: 12px; height: 12px; border-radius: 3px;
  margin-right: 6px; vertical-align: -1px; }
.legend b { font-variant-numeric: tabular-nums; }
.pill { display: inline-block; font-size: 12px; font-weight: 600; padding: 1px 8px;
  border-radius: 999px; white-space: nowrap; }
.pill.ok { background: #e3f4ec; color: var(--ok); }
.pill.warn { background: #fdf0dc; color: var(--warn); }
.pill.bad { background: #fbe4e2; color: var(--bad); }
.alarm { border-left: 4px solid var(--bad); background: #fdf3f2; padding: 8px 12px;
  margin: 0 0 8px; border-radius: 0 6px 6px 0; }
.banner { margin-bottom: 20px; }
.calm { color: var(--ok); font-weight: 600; margin: 0 0 8px; }
.empty { text-align: center; padding: 28px 16px; color: var(--muted);
  border: 2px dashed var(--line); border-radius: 10px; }
.empty strong { display: block; color: var(--ink); font-size: 17px; margin-bottom: 4px; }
.errors { margin: 10px 0 0; padding-left: 18px; color: var(--bad); font-size: 13.5px; }
details { margin-top: 10px; font-size: 14px; }
summary { cursor: pointer; color: var(--muted); }
details table { margin-top: 8px; font-size: 13px; }
details td, details th { padding: 3px 6px; }
footer { color: var(--muted); font-size: 13px; text-align: center; margin-top: 24px; }
@media print { body { background: #fff; } section, .card, .kpi { break-inside: avoid; } }
"""


def _section(title: str, lede: str, content: str) -> str:
    return f"<section><h2>{escape(title)}</h2><p class='lede'>{escape(lede)}</p>{content}</section>"


def _card(title: str, content: str, anchor: str = "") -> str:
    where = f' id="{anchor}"' if anchor else ""
    return f'<div class="card"{where}><h2>{escape(title)}</h2>{content}</div>'


def _empty(title: str, hint: str) -> str:
    """`hint` is trusted HTML (it may hold <code>)."""
    return f'<div class="empty"><strong>{escape(title)}</strong>{hint}</div>'


def _kpis(status: dict[str, Any], act: Activity) -> str:
    leads = status["leads"]
    total = sum(leads.values())
    won = leads.get("prospect", 0) + leads.get("customer", 0)
    days = len(act.days)
    tiles = [
        (f"{total:,}", "leads in total"),
        (f"{won:,}", "prospects and customers"),
        (_pct(won, total), "conversion to prospect"),
        (f"{sum(act.sent_per_day):,}", f"emails sent in {days} days"),
        (f"{sum(act.replies):,}", f"replies in {days} days"),
        (f"{status['outbox']['sent_today']:,}", "emails sent today"),
    ]
    return (
        '<div class="kpis">'
        + "".join(
            f'<div class="kpi"><b>{escape(v)}</b><span>{escape(k)}</span></div>' for v, k in tiles
        )
        + "</div>"
    )


# --- funnel ------------------------------------------------------------------------------

STAGES = (
    ("leads", "Leads", "enrolled in the campaign"),
    ("engaged", "Engaged", "wrote back: a genuine reply"),
    ("prospects", "Prospects", "promoted to prospect"),
    ("handed_off", "Handed off", "handoff email sent to a rep"),
)


def _funnels(rows: Sequence[dict[str, Any]]) -> str:
    if not rows or not any(r["leads"] for r in rows):
        return _empty(
            "No leads enrolled yet",
            "Import some and start the worker: "
            "<code>twoway leads import leads.csv --campaign NAME</code> then "
            "<code>twoway run</code>. The funnel fills in as leads reply.",
        )
    parts = []
    for r in rows:
        name = escape(str(r["campaign"]))
        if not r["leads"]:
            parts.append(
                f'<div class="campaign"><h3>{name} <span>· no leads enrolled yet</span></h3></div>'
            )
            continue
        parts.append(
            f'<div class="campaign"><h3>{name} <span>· {r["leads"]:,} leads enrolled, '
            f"{_pct(r['prospects'], r['leads'])} became prospects</span></h3>"
            f"{_funnel_svg(r, f'funnel-{len(parts)}')}</div>"
        )
    return "".join(parts)


def _funnel_svg(r: dict[str, Any], svg_id: str) -> str:
    """Centred bars, one per stage, widths in proportion to the enrolled leads, joined by a
    light band that carries the step-to-step conversion."""
    width, row_h, gap = 1040, 46, 30
    bar_left, bar_w, rate_x = 330, 520, 880
    mid = bar_left + bar_w / 2
    top = 6
    height = top + len(STAGES) * row_h + (len(STAGES) - 1) * gap + 6
    whole = max(int(r["leads"]), 1)
    values = [int(r[key]) for key, _, _ in STAGES]
    widths = [0.0 if v == 0 else max(4.0, bar_w * v / whole) for v in values]
    desc = ", ".join(f"{label} {v}" for (_, label, _), v in zip(STAGES, values, strict=True))
    out = [
        f'<svg viewBox="0 0 {width} {height}" role="img" aria-labelledby="{svg_id}">'
        f'<title id="{svg_id}">Funnel for {escape(str(r["campaign"]))}: {escape(desc)}</title>'
    ]
    for i, ((_, label, note), v) in enumerate(zip(STAGES, values, strict=True)):
        y = top + i * (row_h + gap)
        w = widths[i]
        cy = y + row_h / 2
        if i:
            prev_w, prev_y = widths[i - 1], y - gap
            out.append(
                f'<polygon points="{mid - prev_w / 2:.1f},{prev_y} {mid + prev_w / 2:.1f},{prev_y} '
                f'{mid + w / 2:.1f},{y} {mid - w / 2:.1f},{y}" fill="#e6eef8"/>'
            )
        if i and values[i - 1]:  # no step rate out of an empty stage
            step = _pct(v, values[i - 1])
            out.append(
                f'<text x="{mid:.1f}" y="{y - gap / 2 + 4.5:.1f}" font-size="13" '
                f'text-anchor="middle" style="fill:#33475b">↓ {escape(step)} of '
                f"{escape(STAGES[i - 1][1].lower())}</text>"
            )
        out.append(
            f'<text x="0" y="{cy - 3:.1f}" font-size="16" font-weight="600">{escape(label)}</text>'
            f'<text x="0" y="{cy + 15:.1f}" font-size="13" style="fill:#5b6675">{escape(note)}</text>'
            f'<text x="{bar_left - 24}" y="{cy + 10:.1f}" font-size="28" font-weight="700" '
            f'text-anchor="end">{v:,}</text>'
        )
        if w:
            out.append(
                f'<rect x="{mid - w / 2:.1f}" y="{y}" width="{w:.1f}" height="{row_h}" rx="4" '
                f'fill="{FUNNEL_COLOURS[i]}"><title>{escape(label)}: {v:,} '
                f"({_pct(v, whole)} of leads)</title></rect>"
            )
        else:
            out.append(
                f'<line x1="{mid - bar_w / 2}" x2="{mid + bar_w / 2}" y1="{cy}" y2="{cy}" '
                'stroke="#c4ccd6" stroke-dasharray="4 4"/>'
            )
        out.append(
            f'<text x="{rate_x}" y="{cy + 7:.1f}"><tspan font-size="20" font-weight="700">'
            f'{escape(_pct(v, whole))}</tspan><tspan dx="6" font-size="13" '
            'style="fill:#5b6675">of leads</tspan></text>'
        )
    out.append("</svg>")
    return "".join(out)


# --- daily activity ----------------------------------------------------------------------


def _activity(act: Activity) -> str:
    if act.is_empty:
        return _empty(
            f"Nothing sent or received in the last {len(act.days)} days",
            "Once <code>twoway run</code> sends nurture emails and leads write back, the "
            "daily chart appears here.",
        )
    sent = {k: sum(v) for k, v in act.sends.items()}
    keys = [*(k for k in SEND_KINDS), "replies", "promotions"]
    totals = {**sent, "replies": sum(act.replies), "promotions": sum(act.promotions)}
    legend = "".join(
        f'<li><i style="background:{COLOURS[k]}"></i>{escape(SERIES_LABELS[k])} '
        f"<b>{totals[k]:,}</b></li>"
        for k in keys
    )
    return (
        f'<ul class="legend" aria-label="Legend, with totals for the period">{legend}</ul>'
        + _activity_svg(act)
        + _activity_table(act)
    )


def _activity_svg(act: Activity) -> str:
    """Two panels on one time axis: stacked sends above, replies and promotions below.

    Separate panels because sends outnumber replies by one or two orders of magnitude;
    on one scale the replies, the point of it all, would be a flat line.
    """
    n = len(act.days)
    width, left, right = 1040, 64, 14
    plot_w = width - left - right
    slot = plot_w / n
    a_top, a_h = 14, 200
    b_top, b_h = a_top + a_h + 44, 120
    axis_y = b_top + b_h
    height = axis_y + 58
    out = [
        f'<svg viewBox="0 0 {width} {height}" role="img" aria-labelledby="act-title">'
        f'<title id="act-title">Daily activity from {_day(act.days[0])} to '
        f"{_day(act.days[-1])}: {sum(act.sent_per_day)} emails sent, "
        f"{sum(act.replies)} genuine replies, {sum(act.promotions)} promotions</title>"
    ]
    # Panel A: sends, stacked by kind.
    top_a, ticks_a = _ticks(max(act.sent_per_day))
    out += _grid(left, width - right, a_top, a_h, top_a, ticks_a)
    out.append(_y_title("Emails sent", a_top + a_h / 2))
    bar_w = max(1.0, slot * 0.72)
    for i, d in enumerate(act.days):
        x = left + i * slot + (slot - bar_w) / 2
        base: float = a_top + a_h
        for kind in SEND_KINDS:
            v = act.sends[kind][i]
            if not v:
                continue
            h = a_h * v / top_a
            base -= h
            out.append(
                f'<rect x="{x:.1f}" y="{base:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
                # A hairline of white between stacked kinds: colour is not the only cue.
                f'fill="{COLOURS[kind]}" stroke="#fff" stroke-width="0.75">'
                f"<title>{_day(d)}: {v:,} {escape(SERIES_LABELS[kind].lower())}</title></rect>"
            )
    # Panel B: replies and promotions side by side.
    top_b, ticks_b = _ticks(max(*act.replies, *act.promotions))
    out += _grid(left, width - right, b_top, b_h, top_b, ticks_b)
    out.append(_y_title("Replies · promotions", b_top + b_h / 2))
    pair_w = max(1.0, slot * 0.36)
    for i, d in enumerate(act.days):
        x0 = left + i * slot + (slot - 2 * pair_w) / 2
        for j, (key, values) in enumerate(
            (("replies", act.replies), ("promotions", act.promotions))
        ):
            v = values[i]
            if not v:
                continue
            h = b_h * v / top_b
            out.append(
                f'<rect x="{x0 + j * pair_w:.1f}" y="{b_top + b_h - h:.1f}" width="{pair_w:.1f}" '
                f'height="{h:.1f}" fill="{COLOURS[key]}"><title>{_day(d)}: {v:,} '
                f"{escape(SERIES_LABELS[key].lower())}</title></rect>"
            )
    # Shared time axis: a label every few days, counted back from today so today has one.
    every = max(1, math.ceil(n / 12))
    for i in range(n - 1, -1, -every):
        x = left + (i + 0.5) * slot
        out.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{axis_y}" y2="{axis_y + 5}" stroke="#8a94a3"/>'
            f'<text x="{x:.1f}" y="{axis_y + 20}" font-size="12.5" text-anchor="middle" '
            f'style="fill:#5b6675">{"today" if i == n - 1 else _day(act.days[i])}</text>'
        )
    out.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{axis_y + 48}" font-size="13" '
        'text-anchor="middle" font-weight="600">Day (UTC)</text></svg>'
    )
    return "".join(out)


def _ticks(peak: int) -> tuple[int, list[int]]:
    """A round axis maximum at or above `peak` and up to five whole-number ticks from 0."""
    if peak <= 0:
        return 1, [0, 1]
    raw = peak / 4
    magnitude = 10 ** math.floor(math.log10(raw)) if raw >= 1 else 1
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    step = max(1, int(step))
    top = math.ceil(peak / step) * step
    return top, list(range(0, top + 1, step))


def _grid(x0: float, x1: float, top: float, h: float, peak: int, ticks: list[int]) -> list[str]:
    out = []
    for t in ticks:
        y = top + h - h * t / peak
        colour = "#8a94a3" if t == 0 else "#e3e7ed"
        out.append(
            f'<line x1="{x0}" x2="{x1}" y1="{y:.1f}" y2="{y:.1f}" stroke="{colour}"/>'
            f'<text x="{x0 - 8}" y="{y + 4:.1f}" font-size="12.5" text-anchor="end" '
            f'style="fill:#5b6675">{t:,}</text>'
        )
    return out


def _y_title(text: str, cy: float) -> str:
    return (
        f'<text transform="translate(14 {cy:.1f}) rotate(-90)" font-size="13" '
        f'font-weight="600" text-anchor="middle">{escape(text)}</text>'
    )


def _activity_table(act: Activity) -> str:
    """The numbers behind the chart, for screen readers and for copying into a sheet."""
    head = "".join(
        f'<th class="n">{escape(SERIES_LABELS[k])}</th>'
        for k in (*SEND_KINDS, "replies", "promotions")
    )
    rows = []
    for i, d in enumerate(act.days):
        cells = [act.sends[k][i] for k in SEND_KINDS] + [act.replies[i], act.promotions[i]]
        if not any(cells):
            continue
        rows.append(
            f"<tr><td>{d.isoformat()}</td>"
            + "".join(f'<td class="n">{v:,}</td>' for v in cells)
            + "</tr>"
        )
    return (
        "<details><summary>Show the numbers (days with activity)</summary>"
        f"<table><thead><tr><th>Day</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody>"
        "</table></details>"
    )


# --- tables ------------------------------------------------------------------------------


def _lead_table(leads: dict[str, int]) -> str:
    total = sum(leads.values())
    if not total:
        return _empty(
            "No leads yet",
            "<code>twoway leads import leads.csv</code> adds them from a CSV file.",
        )
    peak = max(leads.values())
    order = [s for s in LeadStatus if s in leads] + [s for s in leads if s not in set(LeadStatus)]
    rows = []
    for s in order:
        n = leads[s]
        width = 100 * n / peak if peak else 0
        rows.append(
            f"<tr><td><b>{escape(s)}</b><small>{escape(STATUS_NOTES.get(s, ''))}</small></td>"
            f'<td class="n">{n:,}</td><td class="n">{_pct(n, total)}</td>'
            f'<td class="share"><div class="bar{"" if n else " zero"}" '
            f'style="width:{width:.1f}%"></div></td></tr>'
        )
    return (
        '<table><thead><tr><th>Status</th><th class="n">Leads</th><th class="n">Share</th>'
        f"<th></th></tr></thead><tbody>{''.join(rows)}</tbody>"
        f'<tfoot><tr><td><b>total</b></td><td class="n"><b>{total:,}</b></td><td></td><td></td>'
        "</tr></tfoot></table>"
    )


def _outbox_table(status: dict[str, Any]) -> str:
    o = status["outbox"]
    alarming = {"failed": "bad", "unknown": "bad"}
    rows = []
    for state, note in OUTBOX_NOTES.items():
        n = int(o.get(state, 0))
        pill = (
            f' <span class="pill {alarming[state]}">check</span>' if n and state in alarming else ""
        )
        rows.append(
            f"<tr><td><b>{escape(state)}</b>{pill}<small>{escape(note)}</small></td>"
            f'<td class="n">{n:,}</td></tr>'
        )
    rows.append(f'<tr><td><b>sent today</b></td><td class="n">{o["sent_today"]:,}</td></tr>')
    due = _when_iso(o.get("next_due")) or "nothing scheduled"
    rows.append(f'<tr><td><b>next step due</b></td><td class="n">{escape(due)}</td></tr>')
    failures = "".join(
        f"<li>{escape(str(f['template']))} to {escape(str(f['to']))}: "
        f"{escape(str(f['error'] or 'no detail'))}</li>"
        for f in status.get("recent_failures", [])
    )
    if failures:
        failures = f'<p class="lede">Latest failures:</p><ul class="errors">{failures}</ul>'
    return (
        '<table><thead><tr><th>State</th><th class="n">Messages</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>{failures}"
    )


def _minutes(seconds: object) -> str:
    if not isinstance(seconds, int):
        return "–"
    if seconds < 3600:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _speed(speed: dict[str, Any]) -> str:
    reps = speed.get("reps") or []
    waiting = speed.get("waiting") or []
    if not reps and not waiting:
        return _empty(
            "No prospect handed to a rep yet",
            "First-response times appear here once reps answer their prospects.",
        )
    sla = speed.get("sla")
    rows = []
    for r in reps:
        breaches = int(r["breaches"])
        pill = "bad" if breaches else "ok"
        rows.append(
            f"<tr><td><b>{escape(str(r['name']))}</b><small>{escape(str(r['rep']))}</small></td>"
            f'<td class="n">{int(r["handoffs"]):,}</td><td class="n">{int(r["answered"]):,}</td>'
            f'<td class="n">{_minutes(r["median_seconds"])}</td>'
            f'<td class="n">{_minutes(r["p90_seconds"])}</td>'
            f'<td class="n"><span class="pill {pill}">{breaches:,}</span></td></tr>'
        )
    table = (
        '<table><thead><tr><th>Rep</th><th class="n">Handed</th><th class="n">Answered</th>'
        '<th class="n">Median first answer</th><th class="n">p90</th>'
        f'<th class="n">Over the SLA{" (" + escape(str(sla)) + ")" if sla else ""}</th>'
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )
    if waiting:
        items = []
        for w in waiting[:20]:
            late = ' <span class="pill bad">over the SLA</span>' if w.get("breached") else ""
            who = f"<b>{escape(str(w['email']))}</b>"
            if w.get("name"):
                who = f"<b>{escape(str(w['name']))}</b><small>{escape(str(w['email']))}</small>"
            items.append(
                f"<tr><td>{who}</td>"
                f"<td>{escape(str(w['rep']))}</td>"
                f'<td class="n">{_minutes(w["waiting_seconds"])}{late}</td></tr>'
            )
        more = len(waiting) - 20
        extra = f'<p class="lede">… and {more:,} more.</p>' if more > 0 else ""
        table += (
            '<h3 style="margin-top:16px">Waiting for a first answer</h3>'
            '<table><thead><tr><th>Prospect</th><th>Rep</th><th class="n">Waiting</th></tr>'
            f"</thead><tbody>{''.join(items)}</tbody></table>{extra}"
        )
    else:
        table += '<p class="calm" style="margin-top:12px">✓ Nobody is waiting for an answer.</p>'
    return table


def _mailbox_table(status: dict[str, Any]) -> str:
    boxes = status["mailboxes"]
    if not boxes:
        body = _empty(
            "No mailbox configured", "Add one under <code>mailboxes</code> in the config."
        )
    else:
        rows = []
        for m in boxes:
            if m["last_error"]:
                health = '<span class="pill bad">error</span>'
            elif m["last_sync"] is None:
                health = '<span class="pill warn">never synced</span>'
            else:
                health = '<span class="pill ok">ok</span>'
            synced = (
                f"{_when_iso(m['last_sync'])}<small>{_ago(m['lag_seconds'])}</small>"
                if m["last_sync"]
                else "never"
            )
            error = (
                f'<small style="color:var(--bad)">{escape(str(m["last_error"]))}</small>'
                if m["last_error"]
                else ""
            )
            mode = "IMAP IDLE" if m["idle"] else "polling"
            rows.append(
                f"<tr><td><b>{escape(str(m['name']))}</b> {health}"
                f"<small>{escape(str(m['kind']))} · {escape(', '.join(m['folders']))} · "
                f"{mode}</small>{error}</td><td>{synced}</td></tr>"
            )
        body = (
            "<table><thead><tr><th>Mailbox</th><th>Last sync</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>"
        )
    inbound = {k: v for k, v in status.get("inbound", {}).items() if v}
    if inbound:
        kinds = " · ".join(
            # Kind None (shown as "None" by status) is mail read before it was classified.
            f"{escape('unclassified' if k == 'None' else k)} <b>{v:,}</b>"
            for k, v in sorted(inbound.items(), key=lambda kv: -kv[1])
        )
        body += f'<p class="lede" style="margin-top:12px">Mail read so far, by kind: {kinds}</p>'
    return body


def _banner(alarms: Sequence[str]) -> str:
    """A line at the top of the page, so an alarm is seen even by those who stop reading
    after the funnel."""
    if not alarms:
        return ""
    n = len(alarms)
    return (
        f'<p class="alarm banner"><b>{n} alarm{"s" if n != 1 else ""}</b>: '
        f'{escape(str(alarms[0]))}{" …" if n > 1 else ""} <a href="#alarms">details</a></p>'
    )


def _alarms(status: dict[str, Any]) -> str:
    alarms = [f'<p class="alarm">{escape(str(a))}</p>' for a in status["alarms"]]
    if not alarms:
        alarms = ['<p class="calm">✓ No alarms: the worker looks healthy.</p>']
    q = int(status["quarantine"])
    if q:
        alarms.append(
            f'<p><span class="pill warn">{q:,} quarantined</span> message(s) could not be '
            "processed; see <code>twoway quarantine list</code>.</p>"
        )
    else:
        alarms.append('<p class="lede">Quarantine is empty: every message was processed.</p>')
    unknown = status.get("unknown_sends", [])
    if unknown:
        items = "".join(
            f"<li>{escape(str(u['template']))} to {escape(str(u['to']))}</li>" for u in unknown[:10]
        )
        alarms.append(f'<ul class="errors">{items}</ul>')
    return "".join(alarms)


# --- formatting --------------------------------------------------------------------------


def _pct(part: int, whole: int) -> str:
    if not whole:
        return "–"
    share = 100 * part / whole
    # One decimal only where it tells apart small rates; 0.4% is not 0%.
    return f"{share:.1f}%" if 0 < share < 10 else f"{share:.0f}%"


def _day(d: date) -> str:
    return f"{d.day} {d.strftime('%b')}"


def _when(at: datetime) -> str:
    return f"{_day(at.date())} {at.year}, {at.strftime('%H:%M')} UTC"


def _when_iso(value: object) -> str | None:
    if not value:
        return None
    at = datetime.fromisoformat(str(value).replace("Z", "+00:00")).astimezone(UTC)
    return _when(at)


def _ago(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return ""
    s = int(seconds)
    if s < 90:
        return f"{s} s ago"
    if s < 90 * 60:
        return f"{round(s / 60)} min ago"
    if s < 36 * 3600:
        return f"{round(s / 3600)} h ago"
    return f"{round(s / 86400)} days ago"
