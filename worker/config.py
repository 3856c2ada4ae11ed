"""Configuration: one YAML file validated once into a frozen, typed object.

This is the only module that reads the environment: `${VAR}` interpolation, `*_file`
secrets, `TWOWAY_CONFIG`, `TWOWAY_DATABASE_URL` and the `TWOWAY_NOW` clock.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

DEFAULT_CONFIG_PATH = Path("config/twoway.yaml")
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_DELAY = re.compile(r"^\s*(\d+)\s*(bd|bh|d|h|m)\s*$")
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class ConfigError(Exception):
    """The configuration file cannot be used; `problems` lists every reason, one per line."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__(f"{path}: " + "; ".join(problems))

    def __str__(self) -> str:
        head = f"{self.path}: {len(self.problems)} problem(s)"
        return "\n".join([head, *(f"  {p}" for p in self.problems)])


class _Model(BaseModel):
    """Frozen, so values derived from the fields are cached (`functools.cached_property`);
    build a changed copy by validation, not `model_copy(update=...)`, which keeps them."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Delay:
    """A step delay: `amount` of `unit` (d days, bd business days, bh business hours,
    h hours, m minutes). Business hours count only the time inside `handoff.business_hours`
    in the rep's time zone."""

    amount: int
    unit: Literal["d", "bd", "bh", "h", "m"]

    @classmethod
    def parse(cls, text: str | int) -> Delay:
        if isinstance(text, int):
            return cls(text, "d")
        m = _DELAY.match(text)
        if not m:
            raise ValueError(
                f"{text!r} is not a delay: use Nd (days), Nbd (business days), "
                "Nbh (business hours), Nh (hours) or Nm"
            )
        return cls(int(m.group(1)), m.group(2))  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"{self.amount}{self.unit}"


def address_of(from_: str) -> str:
    """The bare, lower-cased address of a From value such as 'Acme <sales@example.com>'."""
    m = re.search(r"<([^>]+)>", from_)
    return (m.group(1) if m else from_).strip().lower()


def display_name_of(from_: str) -> str:
    m = re.match(r'\s*"?([^"<]*?)"?\s*<', from_)
    return m.group(1).strip() if m else ""


@dataclass(frozen=True)
class Identity:
    """Who a message is from and which SMTP account carries it (`transport` names it)."""

    address: str
    name: str
    transport: str
    smtp: SmtpConfig | None


def _check_security(security: str, host: str | None) -> None:
    if security == "none" and host not in _LOOPBACK:
        raise ValueError(
            "security: none is only allowed for 127.0.0.1/localhost; use ssl or starttls"
        )


class Credentials(_Model):
    """Password or OAuth2 (XOAUTH2) login; at most one source of each."""

    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    oauth2_token: SecretStr | None = None
    oauth2_token_file: Path | None = None
    oauth2_token_command: str | None = None

    def login_secret(self) -> tuple[Literal["password", "xoauth2", "none"], str]:
        """Return how to log in and the secret, reading files or running the token command now."""
        if self.oauth2_token is not None:
            return "xoauth2", self.oauth2_token.get_secret_value()
        if self.oauth2_token_file is not None:
            return "xoauth2", self.oauth2_token_file.read_text().strip()
        if self.oauth2_token_command:
            out = subprocess.run(
                self.oauth2_token_command, shell=True, capture_output=True, text=True, timeout=60
            )
            if out.returncode != 0:
                raise RuntimeError(f"oauth2_token_command exited with {out.returncode}")
            return "xoauth2", out.stdout.strip()
        if self.password is not None:
            return "password", self.password.get_secret_value()
        if self.password_file is not None:
            return "password", self.password_file.read_text().rstrip("\r\n")
        return "none", ""


class MailboxConfig(Credentials):
    name: str
    kind: Literal["imap", "maildir"] = "imap"
    host: str | None = None
    port: int | None = None
    security: Literal["ssl", "starttls", "none"] = "ssl"
    verify_tls: bool = True
    folders: tuple[str, ...] = ("INBOX",)
    sent_folder: str | None = None
    idle: bool = True
    poll_interval: float = Field(default=60, gt=0)
    batch_size: int = Field(default=200, gt=0)
    timeout: float = Field(default=30, gt=0)
    path: Path | None = None
    move_processed: dict[str, str] = Field(default_factory=dict)
    address: str | None = None
    from_: str | None = Field(default=None, alias="from")
    """The sending identity of campaigns (and reps) naming this mailbox (default: sender.from)."""
    smtp: SmtpConfig | None = None
    """Its own SMTP account, with its own caps (default: the top-level smtp)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("from_")
    @classmethod
    def _from_has_address(cls, v: str | None) -> str | None:
        if v is not None and ("@" not in v or "\n" in v or "\r" in v):
            raise ValueError("needs an address such as 'Ana Lopez <ana@example.com>'")
        return v

    @model_validator(mode="after")
    def _check(self) -> MailboxConfig:
        if self.kind == "imap":
            if not self.host:
                raise ValueError("an imap mailbox needs host")
            _check_security(self.security, self.host)
        elif self.path is None:
            raise ValueError("a maildir mailbox needs path")
        return self

    @property
    def effective_port(self) -> int:
        if self.port:
            return self.port
        return 993 if self.security == "ssl" else 143


class SmtpConfig(Credentials):
    kind: Literal["smtp", "maildir"] = "smtp"
    host: str | None = None
    port: int | None = None
    security: Literal["ssl", "starttls", "none"] = "starttls"
    verify_tls: bool = True
    timeout: float = Field(default=30, gt=0)
    max_per_minute: int | None = Field(default=None, gt=0)
    max_per_day: int | None = Field(default=None, gt=0)
    max_attempts: int = Field(default=5, gt=0)
    max_message_bytes: int = Field(default=25 * 1024 * 1024, gt=0)
    path: Path | None = None

    @model_validator(mode="after")
    def _check(self) -> SmtpConfig:
        if self.kind == "smtp":
            if not self.host:
                raise ValueError("smtp needs host (or kind: maildir with path)")
            _check_security(self.security, self.host)
        elif self.path is None:
            raise ValueError("smtp kind: maildir needs path")
        return self

    @property
    def effective_port(self) -> int:
        if self.port:
            return self.port
        return {"ssl": 465, "starttls": 587, "none": 25}[self.security]


def _delay_value(v: Any) -> Delay:
    if isinstance(v, Delay):
        return v
    if isinstance(v, str | int):
        return Delay.parse(v)
    if isinstance(v, dict) and set(v) == {"amount", "unit"}:  # a dumped config
        return Delay.parse(f"{v['amount']}{v['unit']}")
    raise ValueError("a delay is a string such as 0d, 3bd or 4h")


class TouchCap(_Model):
    """At most `count` nurture emails to one person within any `per` (all campaigns)."""

    count: int = Field(gt=0)
    per: Delay

    _per = field_validator("per", mode="before")(classmethod(lambda cls, v: _delay_value(v)))


class SenderConfig(_Model):
    from_: str = Field(alias="from")
    reply_token: bool = True
    unsubscribe_url: str | None = None
    unsubscribe_mailto: str | None = None
    postal_address: str = ""
    auto_submitted: bool = True
    message_id_domain: str | None = None
    max_touches: TouchCap | None = None
    """A per-person cap on nurture emails across every campaign."""
    min_gap: Delay | None = None
    """The least time between any two nurture emails to the same person."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("min_gap", mode="before")
    @classmethod
    def _gap(cls, v: Any) -> Delay | None:
        return None if v is None else _delay_value(v)

    @field_validator("from_")
    @classmethod
    def _has_address(cls, v: str) -> str:
        if "@" not in v or "\n" in v or "\r" in v:
            raise ValueError("needs an address such as 'Acme Sales <sales@example.com>'")
        return v

    @functools.cached_property
    def address(self) -> str:
        """The bare, lower-cased sending address."""
        return address_of(self.from_)

    @functools.cached_property
    def display_name(self) -> str:
        return display_name_of(self.from_)

    @functools.cached_property
    def domain(self) -> str:
        return self.message_id_domain or self.address.rsplit("@", 1)[1]


class SendWindow(_Model):
    days: tuple[str, ...] = WEEKDAYS[:5]
    start: time = time(9, 0)
    end: time = time(17, 0)

    @field_validator("days")
    @classmethod
    def _days(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        out = tuple(d.lower()[:3] for d in v)
        bad = [d for d in out if d not in WEEKDAYS]
        if bad:
            raise ValueError(f"unknown day(s) {bad}; use {', '.join(WEEKDAYS)}")
        return out

    @model_validator(mode="after")
    def _order(self) -> SendWindow:
        if self.end <= self.start:
            raise ValueError("end must be after start")
        return self


class Step(_Model):
    """One email of a sequence; `template` may list several (variants, split evenly)."""

    template: str
    variants: tuple[str, ...] = ()
    """Every template of the step when it has variants (the first is also `template`)."""
    delay: Delay = Delay(0, "d")

    @model_validator(mode="before")
    @classmethod
    def _variants(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("template"), list | tuple):
            names = list(data["template"])
            if not names or not all(isinstance(n, str) and n for n in names):
                raise ValueError("template: list one or more template names")
            if len(set(names)) != len(names):
                raise ValueError("template: the same template is listed twice")
            data = {**data, "template": names[0], "variants": names if len(names) > 1 else []}
        return data

    @field_validator("delay", mode="before")
    @classmethod
    def _delay(cls, v: Any) -> Delay:
        return _delay_value(v)

    @property
    def templates(self) -> tuple[str, ...]:
        """The step's templates: its variants, or its one template."""
        return self.variants or (self.template,)


def _zone(v: str) -> str:
    try:
        ZoneInfo(v)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {v!r} (use an IANA name such as Europe/Paris)"
        ) from None
    return v


class Campaign(_Model):
    name: str
    mailbox: str | None = None
    timezone: str = "UTC"
    send_window: SendWindow | None = SendWindow()
    steps: tuple[Step, ...] = Field(min_length=1)
    max_per_domain_per_day: int | None = Field(default=None, gt=0)
    account_awareness: bool = True
    skip_holidays: bool = False

    _tz = field_validator("timezone")(classmethod(lambda cls, v: _zone(v)))


def country_code(text: str) -> str:
    """An ISO 3166 alpha-2 country code, upper-cased; ValueError saying what is wrong.

    The rule of the leads CSV and of every country in the config: a rule naming `Spain`
    or `UK` would never match a lead (whose country is `ES`, `GB`)."""
    code = text.strip()
    if not re.fullmatch(r"[A-Za-z]{2}", code):
        raise ValueError(f"country {text!r} is not an ISO 3166 two-letter code (e.g. ES, DE)")
    if code.upper() == "UK":
        raise ValueError("country 'UK' is not an ISO 3166 code: the United Kingdom is GB")
    return code.upper()


def _countries(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(country_code(v) for v in values)


class RepMatch(_Model):
    countries: tuple[str, ...] = ()
    industries: tuple[str, ...] = ()
    min_company_size: int | None = None
    max_company_size: int | None = None

    _iso = field_validator("countries")(classmethod(lambda cls, v: _countries(v)))


class Rep(_Model):
    name: str
    email: str
    weight: int = Field(default=1, ge=0)
    daily_cap: int | None = Field(default=None, gt=0)
    away_until: date | None = None
    match: RepMatch | None = None
    mailbox: str | None = None
    timezone: str | None = None
    """The rep's IANA time zone: their business hours (follow-up, SLA) are counted in it
    (default: `handoff.timezone`)."""

    _tz = field_validator("timezone")(classmethod(lambda cls, v: v if v is None else _zone(v)))

    @field_validator("email")
    @classmethod
    def _email(cls, v: str) -> str:
        if "@" not in v:
            raise ValueError("not an email address")
        return v.strip().lower()


class Fit(_Model):
    industries: tuple[str, ...] = ()
    min_company_size: int | None = None
    min_annual_revenue: int | None = None
    countries: tuple[str, ...] = ()

    _iso = field_validator("countries")(classmethod(lambda cls, v: _countries(v)))


class Qualification(_Model):
    require_fit: bool = False
    min_score: int = 0
    fit: Fit = Fit()
    authority_titles: tuple[str, ...] = (
        "ceo", "cto", "cfo", "coo", "founder", "owner", "vp", "head of", "director",
    )  # fmt: skip
    intent_phrases: tuple[str, ...] = (
        "pricing", "price", "quote", "demo", "trial", "budget", "proposal", "timeline",
    )  # fmt: skip


class FollowUp(_Model):
    template: str = "followup/thanks"
    delay: Delay = Delay(1, "bh")
    """How long twoway waits for the rep to answer before it answers in the rep's name."""
    from_: Literal["rep", "sender"] = Field(default="rep", alias="from")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    _delay = field_validator("delay", mode="before")(Step._delay.__func__)  # type: ignore[attr-defined]


def _optional_delay(v: Any) -> Delay | None:
    return None if v is None else Step._delay.__func__(Step, v)  # type: ignore[attr-defined]


class Handoff(_Model):
    template: str = "handoff/rep"
    reply_template: str = "handoff/reply"
    """The reply-ready copy of the prospect's message the rep answers from."""
    reminder_template: str = "handoff/reminder"
    escalation_template: str = "handoff/escalation"
    follow_up: FollowUp | None = FollowUp()
    sla: Delay | None = None
    """Speed to lead: the rep gets one reminder when they have not answered after this."""
    escalate_after: Delay | None = None
    """The second threshold (default: twice `sla`): escalate once, by `escalate_to`."""
    escalate_to: str | None = None
    """`reassign` (the next eligible rep takes the prospect) or a manager's address."""
    timezone: str = "UTC"
    """The time zone of reps without their own `timezone`."""
    business_hours: SendWindow = SendWindow()
    """When business hours (`bh`) run, in the rep's zone; reminders go out inside them."""

    _tz = field_validator("timezone")(classmethod(lambda cls, v: _zone(v)))
    _sla = field_validator("sla", "escalate_after", mode="before")(
        classmethod(lambda cls, v: _optional_delay(v))
    )

    @field_validator("escalate_to")
    @classmethod
    def _escalate_to(cls, v: str | None) -> str | None:
        if v is None or v == "reassign":
            return v
        if "@" not in v or any(ch in v for ch in " ,;<>\r\n"):
            raise ValueError("use `reassign` or one bare email address such as boss@example.com")
        return v.strip().lower()

    @property
    def escalation_delay(self) -> Delay | None:
        """When to escalate: `escalate_after`, else twice the SLA (None: never)."""
        if self.escalate_to is None:
            return None
        if self.escalate_after is not None:
            return self.escalate_after
        return Delay(self.sla.amount * 2, self.sla.unit) if self.sla else None


class Bounces(_Model):
    soft_limit: int = Field(default=3, gt=0)
    soft_window_days: int = Field(default=30, gt=0)


class AutoReply(_Model):
    max_pause_days: int = Field(default=30, ge=0)


class Referrals(_Model):
    referrer: Literal["stop", "prospect"] = "stop"
    """What happens to a lead who points us to a colleague: nurture stops, or a prospect."""


class Workers(_Model):
    lease_seconds: float = Field(default=60, ge=5)
    """A mailbox's lease lasts this long unless renewed; a dead worker's is taken over after it."""
    busy_timeout: float = Field(default=30, gt=0, le=3600)
    """SQLite: seconds a statement waits for another process's lock; past it the pass
    fails temporarily and is retried with backoff (nothing is quarantined)."""
    parse_processes: int | None = Field(default=None, ge=0, le=16)
    """Processes that parse and classify fetched mail up to two batches ahead of the
    database work; None: one when the machine has more than one core, none on one core;
    0: off."""


class Webhook(_Model):
    """A CRM endpoint that receives conversion events as signed JSON POSTs."""

    name: str
    url: str
    secret: SecretStr | None = None
    secret_file: Path | None = None
    events: tuple[str, ...] = ()
    """Event types to send (empty: all of them)."""
    timeout: float = Field(default=10, gt=0, le=120)
    max_attempts: int = Field(default=10, gt=0, le=100)
    backoff_seconds: float = Field(default=30, gt=0)
    """The first retry's wait; each later one doubles, up to an hour, with jitter."""

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("needs an http(s) URL such as https://crm.example.com/hooks/twoway")
        if parts.scheme == "http" and parts.hostname not in _LOOPBACK:
            raise ValueError("plain http is only allowed for 127.0.0.1/localhost; use https")
        return v

    @field_validator("events")
    @classmethod
    def _events(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [e for e in v if e not in CRM_EVENT_TYPES]
        if bad:
            raise ValueError(f"unknown event(s) {bad}; use {', '.join(CRM_EVENT_TYPES)}")
        return v

    @model_validator(mode="after")
    def _one_secret(self) -> Webhook:
        if (self.secret is None) == (self.secret_file is None):
            raise ValueError("give exactly one of secret (e.g. ${WEBHOOK_SECRET}) or secret_file")
        return self

    def secret_value(self) -> bytes:
        """The signing secret, read from the file now when it lives in one."""
        if self.secret is not None:
            return self.secret.get_secret_value().encode()
        assert self.secret_file is not None
        return self.secret_file.read_text().strip().encode()


CRM_EVENT_TYPES = (
    "lead.promoted",
    "lead.rep_answered",
    "lead.customer",
    "lead.disqualified",
    "lead.unsubscribed",
    "lead.bounced",
)


class Alarms(_Model):
    silent_hours: int = Field(default=48, gt=0)
    bounce_rate: float = Field(default=0.05, gt=0, le=1)
    mailbox_failing_seconds: float = Field(default=900, ge=0)
    """/healthz and `status --check` fail once a mailbox has failed for longer than this."""


class Console(_Model):
    """Who may log in to the console: a password (checked against its scrypt hash, from
    `twoway hash-password`) or a token; the session cookie is signed with `session_secret`
    (default: a random one per process, so a restart logs everyone out)."""

    password_hash: SecretStr | None = None
    password_hash_file: Path | None = None
    token: SecretStr | None = None
    token_file: Path | None = None
    session_secret: SecretStr | None = None
    session_secret_file: Path | None = None
    session_hours: float = Field(default=12, gt=0)
    max_login_failures: int = Field(default=5, gt=0)
    """Failed logins per client address per 5 minutes before it is refused (HTTP 429)."""


def read_secret(value: SecretStr | None, file: Path | None) -> str | None:
    """A secret given inline (`${ENV}`) or in a file, read now; None when neither is set."""
    text = None
    if value is not None:
        text = value.get_secret_value()
    elif file is not None:
        text = file.read_text(encoding="utf-8").strip()
    return text or None


class Serve(_Model):
    """`twoway serve`: one-click unsubscribe, /healthz, /metrics and the console."""

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    public_url: str | None = None
    """Where people reach it (https, behind your proxy); nurture mail links /u/TOKEN there."""
    trusted_proxies: tuple[str, ...] = ("127.0.0.1",)
    """Proxies whose X-Forwarded-For/-Proto are believed (the client address of rate limits)."""
    undo_minutes: float = Field(default=10, ge=0)
    metrics_token: SecretStr | None = None
    metrics_token_file: Path | None = None
    console: Console = Console()

    @field_validator("public_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not re.fullmatch(r"https?://[^\s/?#<>\"']+(/[^\s?#<>\"']*)?", v):
            raise ValueError("an http(s) URL such as https://twoway.example.com")
        return v.rstrip("/")


class Config(_Model):
    """The whole validated configuration; `path` is the file it came from."""

    database: str = "sqlite:///twoway.db"
    templates_dir: Path | None = None
    mailboxes: tuple[MailboxConfig, ...] = ()
    smtp: SmtpConfig | None = None
    sender: SenderConfig
    internal_domains: tuple[str, ...] = ()
    campaigns: tuple[Campaign, ...] = ()
    reps: tuple[Rep, ...] = ()
    assignment: Literal["rules_then_round_robin", "round_robin"] = "rules_then_round_robin"
    qualification: Qualification = Qualification()
    handoff: Handoff = Handoff()
    bounces: Bounces = Bounces()
    auto_reply: AutoReply = AutoReply()
    alarms: Alarms = Alarms()
    referrals: Referrals = Referrals()
    workers: Workers = Workers()
    serve: Serve = Serve()
    unknown_senders: Literal["record", "create_lead"] = "record"
    webhooks: tuple[Webhook, ...] = ()
    path: Path = Field(default=Path("<memory>"), exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _unsubscribe_default(cls, data: Any) -> Any:
        """With `serve.public_url`, nurture mail links to our own /u/TOKEN page unless
        `sender.unsubscribe_url` says otherwise."""
        if not isinstance(data, dict):
            return data
        serve, sender = data.get("serve"), data.get("sender")
        url = serve.get("public_url") if isinstance(serve, dict) else None
        if isinstance(url, str) and isinstance(sender, dict) and not sender.get("unsubscribe_url"):
            data = {**data, "sender": {**sender, "unsubscribe_url": url.rstrip("/") + "/u/{token}"}}
        return data

    @model_validator(mode="after")
    def _references(self) -> Config:
        names = [m.name for m in self.mailboxes]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"mailboxes: duplicate name(s) {sorted(dupes)}")
        cnames = [c.name for c in self.campaigns]
        if len(set(cnames)) != len(cnames):
            raise ValueError("campaigns: names must be unique")
        hooks = [w.name for w in self.webhooks]
        if len(set(hooks)) != len(hooks):
            raise ValueError("webhooks: names must be unique")
        return self

    @property
    def templates_path(self) -> Path:
        """`templates_dir` (relative to the config file), else `templates/` beside the file,
        else the checkout's top-level `templates/` when the file sits in `config/`."""
        return _templates_path(self.path.parent, self.templates_dir)

    def campaign(self, name: str) -> Campaign:
        for c in self.campaigns:
            if c.name == name:
                return c
        raise KeyError(name)

    def mailbox(self, name: str | None) -> MailboxConfig | None:
        return next((m for m in self.mailboxes if m.name == name), None) if name else None

    def identity(self, mailbox: str | None) -> Identity:
        """The sending identity and SMTP account of a mailbox (or the defaults)."""
        mb = self.mailbox(mailbox)
        from_ = mb.from_ if mb is not None and mb.from_ else self.sender.from_
        own_smtp = mb is not None and mb.smtp is not None
        return Identity(
            address=address_of(from_),
            name=display_name_of(from_),
            transport=mb.name if own_smtp and mb is not None else "default",
            smtp=mb.smtp if own_smtp and mb is not None else self.smtp,
        )

    def transport_mailboxes(self, transport: str) -> tuple[str | None, ...]:
        """The mailbox names (None: none named) whose mail an SMTP account carries."""
        if transport != "default":
            return (transport,)
        return (None, *(m.name for m in self.mailboxes if m.smtp is None))

    @functools.cached_property
    def reply_bases(self) -> frozenset[str]:
        """Local parts our reply-token addresses are built on (`sales` in sales+TOKEN@…)."""
        froms = [self.sender.from_, *(m.from_ for m in self.mailboxes if m.from_)]
        return frozenset(address_of(f).rsplit("@", 1)[0] for f in froms)

    def rep(self, email: str) -> Rep | None:
        for r in self.reps:
            if r.email == email.lower():
                return r
        return None

    def rep_timezone(self, email: str | None) -> str:
        """The IANA zone a rep's business hours are counted in."""
        rep = self.rep(email) if email else None
        return rep.timezone if rep is not None and rep.timezone else self.handoff.timezone

    @functools.cached_property
    def our_addresses(self) -> frozenset[str]:
        """Addresses whose mail is ours or our team's (never a lead's reply)."""
        out = {self.sender.address}
        out.update(r.email for r in self.reps)
        if self.handoff.escalate_to and self.handoff.escalate_to != "reassign":
            out.add(self.handoff.escalate_to)
        for m in self.mailboxes:
            for a in (m.address, m.username, address_of(m.from_) if m.from_ else None):
                if a and "@" in a:
                    out.add(a.lower())
        return frozenset(out)

    @functools.cached_property
    def our_domains(self) -> frozenset[str]:
        return frozenset(d.lower() for d in self.internal_domains)


# --- loading ---------------------------------------------------------------------------


class _LineLoader(yaml.SafeLoader):
    """A YAML loader that remembers the line of every mapping key and sequence item."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    out: dict[Any, Any] = {}
    lines: dict[Any, int] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        out[key] = loader.construct_object(value_node, deep=True)
        lines[key] = key_node.start_mark.line + 1
    out["__lines__"] = lines
    out["__line__"] = node.start_mark.line + 1
    return out


_LineLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


def _strip_lines(data: Any, path: str, lines: dict[str, int]) -> Any:
    """Remove the line bookkeeping, recording `key.path -> line` in `lines`."""
    if isinstance(data, dict):
        key_lines = data.pop("__lines__", {})
        own = data.pop("__line__", None)
        if own is not None and path not in lines:
            lines[path] = own
        out = {}
        for k, v in data.items():
            sub = f"{path}.{k}" if path else str(k)
            if k in key_lines:
                lines[sub] = key_lines[k]
            out[k] = _strip_lines(v, sub, lines)
        return out
    if isinstance(data, list):
        return [_strip_lines(v, f"{path}[{i}]", lines) for i, v in enumerate(data)]
    return data


def _interpolate(data: Any, path: str, env: Mapping[str, str], base: Path, problems: list[str],
                 lines: dict[str, int]) -> Any:  # fmt: skip
    """Expand `${VAR}` and read `*_file` secrets; unknown variables are problems."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            sub = f"{path}.{k}" if path else str(k)
            if isinstance(k, str) and k.endswith("_file") and isinstance(v, str):
                v = _interpolate(v, sub, env, base, problems, lines)
                p = Path(v)
                out[k] = p if p.is_absolute() else base / p
                if not out[k].is_file():
                    problems.append(_where(sub, lines) + f": secret file {out[k]} does not exist")
                continue
            out[k] = _interpolate(v, sub, env, base, problems, lines)
        return out
    if isinstance(data, list):
        return [
            _interpolate(v, f"{path}[{i}]", env, base, problems, lines) for i, v in enumerate(data)
        ]
    if isinstance(data, str) and "${" in data:

        def repl(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            problems.append(_where(path, lines) + f": environment variable {name} is not set")
            return ""

        return _ENV_REF.sub(repl, data)
    return data


def _templates_path(base: Path, templates_dir: Path | None) -> Path:
    if templates_dir is not None:
        return templates_dir if templates_dir.is_absolute() else base / templates_dir
    beside = base / "templates"
    if not beside.is_dir() and (base.parent / "templates").is_dir():
        return base.parent / "templates"
    return beside


def _items(data: dict[str, Any], key: str) -> list[tuple[int, dict[str, Any]]]:
    value = data.get(key)
    if not isinstance(value, list):
        return []
    return [(i, v) for i, v in enumerate(value) if isinstance(v, dict)]


def _mailbox_problems(data: dict[str, Any], lines: dict[str, int]) -> list[str]:
    """Mailbox names that point nowhere, found in the raw data so they are reported with
    the schema's problems, each with its line."""
    problems: list[str] = []
    names = {m.get("name") for _, m in _items(data, "mailboxes")}
    for section in ("campaigns", "reps"):
        for i, item in _items(data, section):
            mb = item.get("mailbox")
            if mb is not None and mb not in names:
                known = ", ".join(sorted(str(n) for n in names if n)) or "none configured"
                where = _where(f"{section}[{i}].mailbox", lines)
                problems.append(f"{where}: no mailbox named {mb!r} (mailboxes: {known})")
    return problems


def missing_templates(path: Path) -> list[str]:
    """The template folders a config file names that do not exist, each with its key and
    line; best effort for a file that does not validate ([] if it is not YAML at all)."""
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_LineLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []
    if not isinstance(raw, dict):
        return []
    lines: dict[str, int] = {}
    data = _strip_lines(raw, "", lines)
    problems: list[str] = []
    tdir = data.get("templates_dir")
    base = path.parent
    root = _templates_path(base, Path(tdir) if isinstance(tdir, str) else None)
    wanted: list[tuple[str, Any]] = []
    for i, c in _items(data, "campaigns"):
        steps = c.get("steps")
        for j, step in enumerate(steps if isinstance(steps, list) else []):
            t = step.get("template") if isinstance(step, dict) else None
            for k, name in enumerate(t if isinstance(t, list) else [t]):
                suffix = f"[{k}]" if isinstance(t, list) else ""
                wanted.append((f"campaigns[{i}].steps[{j}].template{suffix}", name))
    handoff = data.get("handoff") if isinstance(data.get("handoff"), dict) else {}
    assert isinstance(handoff, dict)
    wanted.append(("handoff.template", handoff.get("template", "handoff/rep")))
    fu = handoff.get("follow_up", {})
    if isinstance(fu, dict):
        wanted.append(("handoff.follow_up.template", fu.get("template", "followup/thanks")))
    for key, name in wanted:
        if isinstance(name, str) and not (root / name / "subject.txt").is_file():
            problems.append(f"{_where(key, lines)}: no template {name!r} in {root}")
    return problems


def _where(path: str, lines: dict[str, int]) -> str:
    probe = path
    while probe:
        if probe in lines:
            return f"line {lines[probe]}: {path}"
        shorter = probe.rsplit(".", 1)[0] if "." in probe else probe.split("[", 1)[0]
        if shorter == probe:
            break
        probe = shorter
    return path


def _loc_to_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith("function-after") or part.startswith("function-"):
            continue
        else:
            out += f".{part}" if out else part
    return out.replace("from_", "from")


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read, interpolate and validate a config file; raise ConfigError naming every problem.

    `path` defaults to `TWOWAY_CONFIG`, then `config/twoway.yaml`.
    """
    env = os.environ if env is None else env
    cfg_path = Path(path or env.get("TWOWAY_CONFIG") or DEFAULT_CONFIG_PATH)
    try:
        text = cfg_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        hint = "copy config/twoway.example.yaml, pass --config FILE, or try `twoway demo`"
        raise ConfigError(str(cfg_path), [f"no such file ({hint})"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(str(cfg_path), [f"cannot read: {e}"]) from None
    return parse_config(text, cfg_path, env)


def parse_config(text: str, cfg_path: Path, env: Mapping[str, str]) -> Config:
    """Validate YAML text as a config; `cfg_path` anchors relative paths and messages."""
    try:
        raw = yaml.load(text, Loader=_LineLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise ConfigError(
            str(cfg_path), [f"{where}not valid YAML: {getattr(e, 'problem', e)}"]
        ) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(str(cfg_path), ["the file must be a mapping of sections"])
    lines: dict[str, int] = {}
    data = _strip_lines(raw, "", lines)
    problems: list[str] = []
    base = cfg_path.parent
    data = _interpolate(data, "", env, base, problems, lines)
    if env.get("TWOWAY_DATABASE_URL"):
        data["database"] = env["TWOWAY_DATABASE_URL"]
    if isinstance(data.get("database"), str) and data["database"].startswith("sqlite:///"):
        db_file = data["database"][len("sqlite:///") :]
        if db_file and not db_file.startswith("/") and db_file != ":memory:":
            data["database"] = f"sqlite:///{(base / db_file).resolve()}"

    def local_path(section: Any) -> None:
        """Make a section's relative `path` relative to the config file."""
        path = section.get("path") if isinstance(section, dict) else None
        if isinstance(path, str) and not Path(path).is_absolute():
            section["path"] = str((base / path).resolve())

    for m in data.get("mailboxes") or []:
        local_path(m)
        if isinstance(m, dict):
            local_path(m.get("smtp"))
    local_path(data.get("smtp"))
    problems += _mailbox_problems(data, lines)
    data["path"] = cfg_path
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        locs = [tuple(err["loc"]) for err in errors]
        for err in errors:
            loc = tuple(err["loc"])
            # A list with a broken item also reports itself "too short": the item says more.
            if err["type"] == "too_short" and any(o[: len(loc)] == loc and o != loc for o in locs):
                continue
            key = _loc_to_path(loc)
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key (check the spelling against config/twoway.example.yaml)"
            elif err["type"] == "missing":
                msg = "required key is missing"
            problems.append(f"{_where(key, lines) if key else 'top level'}: {msg}")
    if problems:
        raise ConfigError(str(cfg_path), problems)
    return cfg


def config_from_dict(data: dict[str, Any], path: Path = Path("<memory>")) -> Config:
    """Validate an in-memory config (demo, tests); raises ConfigError like load_config."""
    return parse_config(yaml.safe_dump(data, sort_keys=False), path, {})


# --- the clock -------------------------------------------------------------------------

Clock = Callable[[], datetime]


def clock_from_env(env: Mapping[str, str] | None = None) -> Clock:
    """The real UTC clock, or a fixed instant when `TWOWAY_NOW` is set (tests, demos)."""
    env = os.environ if env is None else env
    fixed = env.get("TWOWAY_NOW")
    if not fixed:
        return lambda: datetime.now(UTC)
    try:
        at = datetime.fromisoformat(fixed.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError("TWOWAY_NOW", [f"{fixed!r} is not an ISO 8601 instant"]) from None
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    at = at.astimezone(UTC)
    return lambda: at


MailboxConfig.model_rebuild()  # it refers to SmtpConfig, defined after it
