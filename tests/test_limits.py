"""Limits: templates render within bounds and oversized messages never reach SMTP.

The attacks of issue 12 item 9, as an admin (or a careless edit) would make them: nested
`range(100000)` loops, a template that writes 3 GB, one that makes 30 MB emails. `twoway
templates lint` and `config check` name each with its file and line, exit 2 and stay in
bounded memory; at send time such a row fails with the reason and the rows behind it are
sent. A message larger than the server's advertised SIZE (RFC 1870) or than
smtp.max_message_bytes fails before any SMTP transaction begins.
"""

from __future__ import annotations

import json
import mailbox
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from sqlalchemy import create_engine, select

from tests import hostile
from tests.conftest import ROOT, base_config_data, twoway_cmd
from tests.imap_server import DovecotServer
from tests.smtp_server import SmtpServer
from worker.config import MailboxConfig
from worker.mailbox import MAX_BATCH_BYTES, ImapSource, MaildirSource
from worker.models import InboundMessage, Lead, OutboundMessage, Quarantine
from worker.parsing import MAX_MESSAGE_BYTES
from worker.rendering import Renderer, RenderLimits, TemplateError

NOW = "2026-12-01T10:00:00Z"
MAX_RSS_MB = 300

ATTACKS = hostile.TEMPLATE_ATTACKS
GROWTH = hostile.TEMPLATE_GROWTH


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str
    peak_rss_mb: float


# Runs `python -m worker ARGS` and, at exit, writes the process's VmHWM (its own peak RSS)
# to $TWOWAY_PEAK_FILE. Not os.wait4's ru_maxrss: on Linux a child starts with its
# parent's peak (it survives fork and exec), and this test process builds 20 MB messages.
_PEAK_WRAPPER = """
import atexit, os, runpy

def _peak():
    with open("/proc/self/status") as status:
        kb = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(os.environ["TWOWAY_PEAK_FILE"], "w") as out:
        out.write(kb)

atexit.register(_peak)
runpy.run_module("worker", run_name="__main__", alter_sys=True)
"""


def run_measured(cmd: list[str], tmp_path: Path) -> Run:
    """Run `cmd` (a `python -m worker ...` command line, as a user would run twoway) and
    measure its own peak RSS."""
    assert cmd[1:3] == ["-m", "worker"], cmd
    out, err, peak = tmp_path / "stdout.txt", tmp_path / "stderr.txt", tmp_path / "peak.txt"
    peak.unlink(missing_ok=True)
    env = {**os.environ, "TWOWAY_NOW": NOW, "TWOWAY_PEAK_FILE": str(peak)}
    with out.open("wb") as o, err.open("wb") as e:
        done = subprocess.run(
            [cmd[0], "-c", _PEAK_WRAPPER, *cmd[3:]], stdout=o, stderr=e, env=env, timeout=600
        )
    peak_mb = int(peak.read_text()) / 1024
    print(f"peak RSS {peak_mb:.1f} MB: twoway {' '.join(cmd[3:])}")  # shown with pytest -s
    return Run(done.returncode, out.read_text(), err.read_text(), peak_mb)


def with_attacks(tmp_path: Path, attacks: dict[str, str]) -> Path:
    """A private copy of the shipped templates plus one folder per attack."""
    templates = tmp_path / "templates"
    shutil.copytree(ROOT / "templates", templates)
    for name, line in attacks.items():
        shutil.copytree(templates / "nurture/welcome", templates / name)
        body = templates / name / "body.txt"
        body.write_text(
            body.read_text().replace("{% block body %}\n", "{% block body %}\n" + line + "\n", 1)
        )
    return templates


def write_config(tmp_path: Path, database: str, **overrides: object) -> Path:
    cfg = tmp_path / "twoway.yaml"
    cfg.write_text(yaml.safe_dump(base_config_data(database, tmp_path, **overrides)))
    return cfg


def campaign(name: str, template: str) -> dict[str, object]:
    return {
        "name": name,
        "mailbox": "sales",
        "send_window": None,
        "steps": [{"template": template, "delay": "0d"}],
    }


def import_into(cfg: Path, tmp_path: Path, name: str, email: str) -> None:
    leads = tmp_path / f"{name}.csv"
    leads.write_text(f"email,first_name\n{email},Sam\n")
    done = subprocess.run(
        twoway_cmd(cfg, "leads", "import", str(leads), "--campaign", name),
        env={**os.environ, "TWOWAY_NOW": NOW},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


@dataclass(frozen=True)
class Row:
    status: str
    attempts: int
    last_error: str


def outbox(database: str) -> dict[str, Row]:
    """Each outbox row by recipient, as `twoway` left it."""
    engine = create_engine(database)
    t = OutboundMessage
    with engine.connect() as conn:
        rows = conn.execute(select(t.to_addr, t.status, t.attempts, t.last_error)).all()
    engine.dispose()
    return {to: Row(str(status), attempts, error or "") for to, status, attempts, error in rows}


# --- lint and config check ------------------------------------------------------------------


def test_templates_lint_names_each_runaway_template_and_stays_in_bounded_memory(
    tmp_path: Path, sqlite_url: str
) -> None:
    templates = with_attacks(tmp_path, ATTACKS)
    cfg = write_config(tmp_path, sqlite_url, templates_dir=str(templates))
    run = run_measured(twoway_cmd(cfg, "templates", "lint"), tmp_path)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    for name in ATTACKS:
        # The attack is the line right after `{% block body %}` (line 3 of the copy).
        assert f"{name}/body.txt:3: exceeds a render limit: " in run.stderr, run.stderr
    # About 0.3 s of steps; on a machine slow enough the 5 s deadline comes first.
    loops = "nurture/loops/body.txt:3: exceeds a render limit: "
    assert any(
        loops + why in run.stderr
        for why in ("does more than 1,000,000 steps", "takes longer than 5 s")
    ), run.stderr
    assert "three-gb/body.txt:3: exceeds a render limit: writes or builds more than" in run.stderr
    assert "thirty-mb/body.txt:3: exceeds a render limit: writes or builds more than" in run.stderr
    assert "3 template problem(s)" in run.stderr  # the shipped templates are fine
    assert run.peak_rss_mb < MAX_RSS_MB, run.peak_rss_mb


def test_config_check_reports_a_campaigns_runaway_template_with_exit_2(
    tmp_path: Path, sqlite_url: str
) -> None:
    templates = with_attacks(tmp_path, {"nurture/three-gb": ATTACKS["nurture/three-gb"]})
    cfg = write_config(
        tmp_path,
        sqlite_url,
        templates_dir=str(templates),
        campaigns=[campaign("big", "nurture/three-gb")],
    )
    run = run_measured(twoway_cmd(cfg, "config", "check"), tmp_path)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert "nurture/three-gb/body.txt:3: exceeds a render limit: writes or builds more than" in (
        run.stderr
    )
    assert run.peak_rss_mb < MAX_RSS_MB, run.peak_rss_mb


# --- each kind of growth, in the sandbox ------------------------------------------------------


def one_part(tmp_path: Path, source: str) -> Path:
    root = tmp_path / "t"
    (root / "mail").mkdir(parents=True)
    (root / "mail/subject.txt").write_text("Hello")
    (root / "mail/body.txt").write_text("line one\n" + source + "\n")
    (root / "mail/body.html").write_text("<p>Hello</p>")
    return root


@pytest.mark.parametrize("attack", sorted(GROWTH))
def test_it_stops_each_kind_of_growth_at_its_line(tmp_path: Path, attack: str) -> None:
    source, reason = GROWTH[attack]
    # No deadline here: which limit a slow machine reaches first must not decide the test.
    renderer = Renderer(one_part(tmp_path, source), RenderLimits(seconds=float("inf")))
    with pytest.raises(TemplateError) as e:
        renderer.render("mail", {"lead": {"email": "a@b.example"}})
    assert e.value.line == 2
    assert e.value.message.startswith("exceeds a render limit: "), e.value.message
    assert reason in e.value.message, e.value.message


def test_it_stops_a_render_past_its_time(tmp_path: Path) -> None:
    """The deadline, without a timing threshold: a zero-second budget is past at once."""
    renderer = Renderer(
        one_part(tmp_path, "{% for i in range(10) %}{{ i }}{% endfor %}"), RenderLimits(seconds=0)
    )
    with pytest.raises(TemplateError) as e:
        renderer.render("mail", {})
    assert "exceeds a render limit: takes longer than 0 s" in str(e.value)


def test_it_refuses_a_template_file_over_the_size_limit_without_reading_it(
    tmp_path: Path,
) -> None:
    root = one_part(tmp_path, "x" * 2_000)
    renderer = Renderer(root, RenderLimits(file_bytes=1_000))
    with pytest.raises(TemplateError) as e:
        renderer.render("mail", {})
    assert "the template file mail/body.txt is 2,010 bytes (at most 1,000)" in str(e.value)


def test_it_renders_what_ordinary_templates_do(tmp_path: Path) -> None:
    source = (
        "{% for i in range(3) %}{{ i }}{% endfor %} {{ '%5s'|format('x') }} "
        "{{ '{:,}'.format(5000000) }} {{ ['a', 'b']|join(', ') }} {{ 'ab' * 2 }} {{ 2 ** 10 }}"
        " {{ lead.email|replace('@', ' at ') }} {{ 'x'|center(5) }}|"
    )
    out = Renderer(one_part(tmp_path, source)).render("mail", {"lead": {"email": "a@b.example"}})
    assert out.text == "line one\n012     x 5,000,000 a, b abab 1024 a at b.example   x  |\n"


# --- at send time -----------------------------------------------------------------------------


def test_it_fails_a_runaway_render_at_send_time_and_sends_the_rows_behind_it(
    tmp_path: Path, sqlite_url: str, smtp_server: SmtpServer
) -> None:
    templates = with_attacks(tmp_path, {"nurture/thirty-mb": ATTACKS["nurture/thirty-mb"]})
    cfg = write_config(
        tmp_path,
        sqlite_url,
        templates_dir=str(templates),
        smtp=smtp_server.section(),
        campaigns=[campaign("big", "nurture/thirty-mb"), campaign("welcome", "nurture/welcome")],
    )
    import_into(cfg, tmp_path, "big", "first@northwind.example")  # queued first
    import_into(cfg, tmp_path, "welcome", "second@contoso.example")
    run = run_measured(twoway_cmd(cfg, "run", "--once"), tmp_path)
    assert run.returncode == 0, run.stderr
    rows = outbox(sqlite_url)
    big, good = rows["first@northwind.example"], rows["second@contoso.example"]
    assert big.status == "failed"
    assert big.last_error.startswith("cannot build the message: ")
    assert "thirty-mb/body.txt:3: exceeds a render limit: writes or builds more than" in (
        big.last_error
    )
    assert good.status == "sent"
    assert smtp_server.recipients() == ["second@contoso.example"]
    assert not smtp_server.began_for(["first@northwind.example"])
    assert run.peak_rss_mb < MAX_RSS_MB, run.peak_rss_mb


def test_a_runaway_render_built_ahead_of_its_turn_fails_that_row_alone(
    tmp_path: Path, sqlite_url: str, smtp_server: SmtpServer
) -> None:
    # The send pass builds each message while the one before it is spoken over SMTP
    # (another thread): the limits hold there, and the failure is the row's own.
    templates = with_attacks(tmp_path, {"nurture/thirty-mb": ATTACKS["nurture/thirty-mb"]})
    cfg = write_config(
        tmp_path,
        sqlite_url,
        templates_dir=str(templates),
        smtp=smtp_server.section(),
        campaigns=[campaign("big", "nurture/thirty-mb"), campaign("welcome", "nurture/welcome")],
    )
    import_into(cfg, tmp_path, "welcome", "first@contoso.example")
    import_into(cfg, tmp_path, "big", "second@northwind.example")
    import_into(cfg, tmp_path, "welcome", "third@fabrikam.example")
    run = run_measured(twoway_cmd(cfg, "run", "--once"), tmp_path)
    assert run.returncode == 0, run.stderr
    rows = outbox(sqlite_url)
    big = rows["second@northwind.example"]
    assert big.status == "failed"
    assert "thirty-mb/body.txt:3: exceeds a render limit: writes or builds more than" in (
        big.last_error
    )
    assert rows["first@contoso.example"].status == "sent"
    assert rows["third@fabrikam.example"].status == "sent"
    assert sorted(smtp_server.recipients()) == ["first@contoso.example", "third@fabrikam.example"]
    assert not smtp_server.began_for(["second@northwind.example"])
    assert run.peak_rss_mb < MAX_RSS_MB, run.peak_rss_mb


FAT = "{% for i in range(3000) %}{{ 'Plenty of words on a line. ' * 2 }}\n{% endfor %}"


def test_it_refuses_a_message_over_the_servers_advertised_size_before_sending_it(
    tmp_path: Path, sqlite_url: str, smtp_server_factory: Callable[..., SmtpServer]
) -> None:
    server = smtp_server_factory(size_limit=100_000)
    templates = with_attacks(tmp_path, {"nurture/fat": FAT})  # about 170 KB of text
    cfg = write_config(
        tmp_path,
        sqlite_url,
        templates_dir=str(templates),
        smtp=server.section(),
        campaigns=[campaign("big", "nurture/fat"), campaign("welcome", "nurture/welcome")],
    )
    import_into(cfg, tmp_path, "big", "first@northwind.example")
    import_into(cfg, tmp_path, "welcome", "second@contoso.example")
    run = run_measured(twoway_cmd(cfg, "run", "--once"), tmp_path)
    assert run.returncode == 0, run.stderr
    rows = outbox(sqlite_url)
    big, good = rows["first@northwind.example"], rows["second@contoso.example"]
    assert big.status == "failed"
    assert "over the 100,000 bytes the server takes (SIZE in its EHLO, RFC 1870); not sent" in (
        big.last_error
    )
    assert good.status == "sent"
    assert server.recipients() == ["second@contoso.example"]
    assert not server.began_for(["first@northwind.example"])  # no MAIL FROM for it


def test_it_refuses_a_message_over_smtp_max_message_bytes_without_claiming_it(
    tmp_path: Path, sqlite_url: str
) -> None:
    templates = with_attacks(tmp_path, {"nurture/fat": FAT})
    cfg = write_config(
        tmp_path,
        sqlite_url,
        templates_dir=str(templates),
        smtp={"kind": "maildir", "path": str(tmp_path / "outbox"), "max_message_bytes": 100_000},
        campaigns=[campaign("big", "nurture/fat"), campaign("welcome", "nurture/welcome")],
    )
    import_into(cfg, tmp_path, "big", "first@northwind.example")
    import_into(cfg, tmp_path, "welcome", "second@contoso.example")
    run = run_measured(twoway_cmd(cfg, "run", "--once"), tmp_path)
    assert run.returncode == 0, run.stderr
    rows = outbox(sqlite_url)
    big, good = rows["first@northwind.example"], rows["second@contoso.example"]
    assert big.status == "failed" and big.attempts == 0  # never claimed, never handed over
    assert "bytes this SMTP account sends (smtp.max_message_bytes); not sent" in big.last_error
    assert good.status == "sent"
    delivered = list((tmp_path / "outbox" / "new").iterdir())
    assert len(delivered) == 1 and b"second@contoso.example" in delivered[0].read_bytes()


# --- item 8: a message over the read limit, over IMAP and from a Maildir ----------------------

BIG_SIZE = 20 * 1024 * 1024  # over MAX_MESSAGE_BYTES (16 MiB), one message: cheap to make
GENUINE = ["buyer0@company0.example.org", "buyer1@company1.example.org"]
BIG_SENDER = "big@northwind.example"


def big_reply() -> bytes:
    return hostile.big_attachment(BIG_SENDER, "sales@example.com", BIG_SIZE / (70 * 1024 * 1024))


def genuine_reply(sender: str) -> bytes:
    return (
        f"From: {sender}\r\nTo: sales@example.com\r\nSubject: Re: Welcome\r\n"
        f"Message-ID: <{sender.split('@')[0]}.1@example.org>\r\nContent-Type: text/plain\r\n\r\n"
        "Thanks, could you send pricing for 20 seats?\r\n"
    ).encode()


def leads_in(database: str) -> dict[str, str]:
    engine = create_engine(database)
    with engine.connect() as conn:
        status = dict(conn.execute(select(Lead.email, Lead.status)).all())
    engine.dispose()
    return {str(k): str(v) for k, v in status.items()}


def inbound_reasons(database: str) -> dict[str, str]:
    engine = create_engine(database)
    with engine.connect() as conn:
        rows = conn.execute(select(InboundMessage.from_addr, InboundMessage.reason)).all()
        quarantined = conn.execute(select(Quarantine.id)).all()
    engine.dispose()
    assert quarantined == []
    return {str(sender): reason or "" for sender, reason in rows}


@pytest.mark.parametrize("kind", ["imap", "maildir"])
def test_it_reads_the_start_of_a_message_over_the_limit_and_the_replies_behind_it(
    tmp_path: Path, sqlite_url: str, kind: str, request: pytest.FixtureRequest
) -> None:
    raw = big_reply()
    assert len(raw) > MAX_MESSAGE_BYTES
    if kind == "imap":
        dovecot: DovecotServer = request.getfixturevalue("dovecot")
        user = dovecot.fresh_user()
        for message in (raw, *(genuine_reply(g) for g in GENUINE)):
            dovecot.append(user, "INBOX", message)
        mailboxes = [dovecot.mailbox_section(user, timeout=30)]
    else:
        inbox = mailbox.Maildir(tmp_path / "inbox", create=True)
        for message in (raw, *(genuine_reply(g) for g in GENUINE)):
            inbox.add(message)
        mailboxes = [{"name": "sales", "kind": "maildir", "path": str(tmp_path / "inbox")}]
    cfg = write_config(tmp_path, sqlite_url, campaigns=[], mailboxes=mailboxes)
    leads = tmp_path / "leads.csv"
    leads.write_text("email\n" + "\n".join([BIG_SENDER, *GENUINE]) + "\n")
    assert run_measured(twoway_cmd(cfg, "leads", "import", str(leads)), tmp_path).returncode == 0

    run = run_measured(twoway_cmd(cfg, "run", "--once"), tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.peak_rss_mb < MAX_RSS_MB, run.peak_rss_mb
    status = leads_in(sqlite_url)
    assert all(status[g] == "prospect" for g in GENUINE), status  # the replies behind it
    reasons = inbound_reasons(sqlite_url)
    note = f"truncated: message of {len(raw):,} bytes, only the first {MAX_MESSAGE_BYTES:,} read"
    assert note in reasons[BIG_SENDER], reasons[BIG_SENDER]
    assert "truncated" not in reasons[GENUINE[0]]

    shown = run_measured(twoway_cmd(cfg, "leads", "show", BIG_SENDER), tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert f"[{note}]" in shown.stdout, shown.stdout


def test_inspect_says_a_file_over_the_limit_was_truncated_as_the_worker_does(
    tmp_path: Path,
) -> None:
    eml = tmp_path / "big.eml"
    eml.write_bytes(big_reply())
    run = run_measured([sys.executable, "-m", "worker", "inspect", "--json", str(eml)], tmp_path)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    size = eml.stat().st_size
    assert result["truncated"] is True
    assert result["limits"][0] == (
        f"truncated: message of {size:,} bytes, only the first {MAX_MESSAGE_BYTES:,} read"
    )
    assert result["kind"] == "reply"  # classified from what was read
    assert run.peak_rss_mb < MAX_RSS_MB, run.peak_rss_mb


@pytest.mark.parametrize("kind", ["imap", "maildir"])
def test_batches_fit_the_byte_budget_as_well_as_the_count(
    tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    scale = 11 * 1024 * 1024 / (70 * 1024 * 1024)  # three 11 MB messages: 33 MB in all
    messages = [hostile.big_attachment("p@example.org", "sales@example.com", scale)]
    messages = messages * 3 + [genuine_reply(GENUINE[0])]
    source: ImapSource | MaildirSource
    if kind == "imap":
        dovecot: DovecotServer = request.getfixturevalue("dovecot")
        user = dovecot.fresh_user()
        for raw in messages:
            dovecot.append(user, "INBOX", raw)
        source = ImapSource(dovecot.mailbox_config(user, timeout=30))
    else:
        inbox = mailbox.Maildir(tmp_path / "inbox", create=True)
        for raw in messages:
            inbox.add(raw)
        source = MaildirSource(MailboxConfig(name="sales", kind="maildir", path=tmp_path / "inbox"))
    source.connect()
    try:
        batches = [
            [(m.uid, len(m.raw), m.size) for m in b] for b in source.fetch_new("INBOX", 0, 20)
        ]
    finally:
        source.close()
    assert [len(b) for b in batches] == [2, 2]  # 22 MB, then 11 MB and the small reply
    assert all(sum(n for _, n, _ in b) <= MAX_BATCH_BYTES for b in batches)
    assert all(size is None for b in batches for _, _, size in b)  # none over 16 MB: whole
    assert [uid for b in batches for uid, _, _ in b] == [1, 2, 3, 4]


def test_it_refuses_a_subject_longer_than_one_header_line_should_be(tmp_path: Path) -> None:
    """Folding a long header costs time growing with the square of its length."""
    root = one_part(tmp_path, "")
    (root / "mail/subject.txt").write_text("{{ 'word ' * 100000 }}")
    with pytest.raises(TemplateError) as e:
        Renderer(root).render("mail", {})
    assert str(e.value).endswith(
        "mail/subject.txt: exceeds a render limit: the subject is 499,999 characters (at most 998)"
    )
    assert [str(p) for p in Renderer(root).lint({})] == [str(e.value)]
