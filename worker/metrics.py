"""`/metrics`: Prometheus text format, via the official client library (its only importer).

Every scrape reads the database afresh (the figures are the database's, whichever worker
made them), so any number of `twoway serve` processes answer the same.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import select

from worker.app import App
from worker.health import check_health
from worker.models import InboundMessage, OutboundMessage
from worker.status import collect_status

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0)
LATENCY_DAYS = 30
"""The reply → handoff histogram covers handoffs sent in this many days."""


class _TwowayCollector(Collector):
    def __init__(self, app: App) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        status = collect_status(self.app)
        read = CounterMetricFamily(
            "twoway_messages_read", "Inbound messages recorded, per kind.", labels=["kind"]
        )
        for kind, n in sorted(status["inbound"].items()):
            read.add_metric([kind or "none"], n)
        yield read
        sends = GaugeMetricFamily("twoway_sends", "Outbound messages per state.", labels=["state"])
        depth = 0
        for state, n in status["outbox"].items():
            if state in ("sent_today", "next_due"):
                continue
            sends.add_metric([state], n)
            depth += n if state in ("queued", "sending") else 0
        yield sends
        yield GaugeMetricFamily("twoway_outbox_depth", "Sends queued or being sent.", value=depth)
        lag = GaugeMetricFamily(
            "twoway_mailbox_lag_seconds",
            "Seconds since each mailbox was last read in full.",
            labels=["mailbox"],
        )
        for m in status["mailboxes"]:
            if m["lag_seconds"] is not None:
                lag.add_metric([m["name"]], m["lag_seconds"])
        yield lag
        yield GaugeMetricFamily(
            "twoway_quarantine_messages",
            "Quarantined messages waiting for a person.",
            value=status["quarantine"],
        )
        leads = GaugeMetricFamily("twoway_leads", "Leads per status.", labels=["status"])
        for st, n in status["leads"].items():
            leads.add_metric([st], n)
        yield leads
        yield from self._from_rows()
        health = check_health(self.app)
        yield GaugeMetricFamily(
            "twoway_workers_alive", "Workers within their lease.", health.workers
        )
        yield GaugeMetricFamily("twoway_healthy", "1 when /healthz answers 200.", int(health.ok))

    def _from_rows(self) -> Iterator[Metric]:
        bounces = {"soft": 0, "hard": 0}
        latencies: list[float] = []
        since = self.app.now() - timedelta(days=LATENCY_DAYS)
        with self.app.transaction() as s:
            for (b,) in s.execute(
                select(InboundMessage.bounce).where(InboundMessage.kind == "bounce")
            ):
                kind = (b or {}).get("type")
                if kind in bounces:
                    bounces[kind] += 1
            for sent, received in s.execute(
                select(OutboundMessage.sent_at, InboundMessage.received_at)
                .join(InboundMessage, InboundMessage.id == OutboundMessage.inbound_id)
                .where(
                    OutboundMessage.kind == "handoff",
                    OutboundMessage.status == "sent",
                    OutboundMessage.sent_at >= since,
                )
            ):
                if sent is not None:
                    latencies.append(max(0.0, (sent - received).total_seconds()))
        family = CounterMetricFamily(
            "twoway_bounces", "Bounces received, soft and hard.", labels=["type"]
        )
        for kind, n in bounces.items():
            family.add_metric([kind], n)
        yield family
        buckets = [
            (str(edge), float(sum(1 for x in latencies if x <= edge))) for edge in LATENCY_BUCKETS
        ]
        buckets.append(("+Inf", float(len(latencies))))
        yield HistogramMetricFamily(
            "twoway_reply_to_handoff_seconds",
            f"From a prospect's reply arriving to the rep's handoff sent (last {LATENCY_DAYS} days).",
            buckets=buckets,
            sum_value=sum(latencies),
        )


def render_metrics(app: App) -> bytes:
    """The text of one scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_TwowayCollector(app))
    return generate_latest(registry)
