"""Templates: the shipped ones render, mistakes are named by file and line, the sandbox holds."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from worker.config import SenderConfig
from worker.rendering import Renderer, TemplateError, sample_context

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
NURTURE = ["nurture/welcome", "nurture/case-study", "nurture/last-call"]


@pytest.fixture
def renderer() -> Renderer:
    return Renderer(TEMPLATES)


def make_templates(root: Path, files: dict[str, str]) -> Renderer:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return Renderer(root)


def one_email(body_txt: str, subject: str = "Hello") -> dict[str, str]:
    return {
        "mail/subject.txt": subject,
        "mail/body.txt": body_txt,
        "mail/body.html": "<p>ok</p>",
    }


def test_it_lists_every_email_template(renderer: Renderer) -> None:
    assert renderer.names() == [
        "followup/thanks",
        "handoff/escalation",
        "handoff/reminder",
        "handoff/rep",
        "handoff/reply",
        "nurture/case-study",
        "nurture/last-call",
        "nurture/welcome",
    ]


def test_it_finds_no_problem_in_the_shipped_templates(renderer: Renderer) -> None:
    assert renderer.lint(sample_context()) == []


@pytest.mark.parametrize("name", NURTURE)
def test_it_renders_the_nurture_emails_with_the_unsubscribe_footer(
    renderer: Renderer, name: str
) -> None:
    ctx = sample_context()
    email = renderer.render(name, ctx)
    assert email.subject and "\n" not in email.subject
    assert "Hi Maya," in email.text
    assert "Hi Maya," in email.html
    for part in (email.text, email.html):
        assert "https://acme.example/unsubscribe/k3x9q2m7" in part
        assert "1 Main Street, Springfield" in part
    assert email.html.lstrip().startswith("<!DOCTYPE html>")


def test_it_offers_unsubscribe_by_reply_when_there_is_no_url(renderer: Renderer) -> None:
    ctx = sample_context()
    ctx["unsubscribe_url"] = None
    email = renderer.render("nurture/welcome", ctx)
    assert 'Reply "unsubscribe"' in email.text
    assert "Unsubscribe with one click" not in email.html


def test_it_gives_the_rep_everything_at_a_glance_without_an_unsubscribe_footer(
    renderer: Renderer,
) -> None:
    email = renderer.render("handoff/rep", sample_context())
    assert email.subject == "New prospect: Maya Patel (Northwind Logistics) replied — fit score 80"
    for part in (email.text, email.html):
        assert "maya.patel@northwind-logistics.example" in part
        assert "Could you send pricing for a team of 12" in part  # what they said
        assert "Decision-making title" in part  # the fit checklist
        assert "Budget confirmed" in part
        assert "How Brightline cut dispatch time by 40%" in part  # the thread
        assert "Industry rule: logistics goes to Ben Okafor" in part
        assert "unsubscribe" not in part.lower()
    assert "[x] Industry is in the target market: logistics" in email.text
    assert "[?] Budget confirmed" in email.text
    assert "HOW TO ANSWER MAYA" in email.text
    assert "Tom Reed, Fleet Manager" in email.text  # the colleague paused because of her
    assert "twoway leads followup cancel maya.patel@northwind-logistics.example" in email.text
    assert "matched by" not in email.text  # plain words, not the matcher's jargon


def test_it_acknowledges_what_the_prospect_asked_without_a_marketing_footer(
    renderer: Renderer,
) -> None:
    ctx = sample_context()
    email = renderer.render("followup/thanks", ctx)
    for part in (email.text, email.html):
        assert "pricing" in part and "invitation" in part
        assert "unsubscribe" not in part.lower()
        assert ctx["sender"]["postal_address"] not in part
    ctx["reply"] = {**ctx["reply"], "asks": []}
    assert "come back to you personally" in renderer.render("followup/thanks", ctx).text


def test_it_gives_the_reply_ready_copy_only_the_prospects_own_words(renderer: Renderer) -> None:
    from worker.contexts import samples

    email = renderer.render("handoff/reply", samples()["rep_copy"])
    assert email.subject == "Re: How Brightline cut dispatch time by 40%"
    assert email.text.startswith("Hi Ben,")
    for part in (email.text, email.html):
        for internal in ("score", "Decision-making", "Internal", "Ben Okafor", "unsubscribe"):
            assert internal not in part


def test_it_answers_the_prospect_in_the_same_thread(renderer: Renderer) -> None:
    ctx = sample_context()
    email = renderer.render("followup/thanks", ctx)
    assert email.subject == "Re: How Brightline cut dispatch time by 40%"
    ctx["reply"] = {**ctx["reply"], "subject": "Pricing question"}
    assert renderer.render("followup/thanks", ctx).subject == "Re: Pricing question"
    assert "Ben Okafor" in email.text


def test_it_uses_the_configured_sender_in_the_sample_data(renderer: Renderer) -> None:
    sender = SenderConfig.model_validate(
        {"from": "Globex Team <hello@globex.example>", "postal_address": "Globex, 2 Elm Rd"}
    )
    email = renderer.render("nurture/welcome", sample_context(sender=sender))
    assert "Globex Team · Globex, 2 Elm Rd" in email.text


def test_it_names_file_and_line_of_an_undefined_variable(tmp_path: Path) -> None:
    renderer = make_templates(tmp_path, one_email("Hello\n\nDear {{ lead.frist_name }},\n"))
    with pytest.raises(TemplateError) as caught:
        renderer.render("mail", sample_context())
    err = caught.value
    assert err.file.endswith("mail/body.txt")
    assert err.line == 3
    assert str(err) == (
        f"{err.file}:3: 'lead' has no attribute 'frist_name' (did you mean 'first_name'?)"
    )


def test_it_names_the_file_as_typed_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_templates(tmp_path / "templates", one_email("Hello\n\nDear {{ lead.frist_name }},\n"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TemplateError) as caught:
        Renderer(Path("templates")).render("mail", sample_context())
    assert str(caught.value).startswith(
        "templates/mail/body.txt:3: 'lead' has no attribute 'frist_name'"
    )


def test_it_suggests_a_close_name_for_an_unknown_variable(tmp_path: Path) -> None:
    renderer = make_templates(tmp_path, one_email("{{ leed.first_name }}"))
    with pytest.raises(TemplateError, match=r"'leed' is undefined \(did you mean 'lead'\?\)"):
        renderer.render("mail", sample_context())


def test_it_reports_an_undefined_variable_in_the_layout_at_its_own_line(tmp_path: Path) -> None:
    renderer = make_templates(
        tmp_path,
        {
            "layout.txt": "{% block body %}{% endblock %}\n--\n{{ sender.postal }}\n",
            **one_email('{% extends "layout.txt" %}{% block body %}Hi{% endblock %}'),
        },
    )
    with pytest.raises(TemplateError) as caught:
        renderer.render("mail", sample_context())
    assert caught.value.file.endswith("layout.txt")
    assert caught.value.line == 3


def test_it_names_file_and_line_of_a_syntax_error(tmp_path: Path) -> None:
    renderer = make_templates(tmp_path, one_email("ok\n{% if lead.first_name %}\nno end\n"))
    with pytest.raises(TemplateError) as caught:
        renderer.render("mail", sample_context())
    assert caught.value.file.endswith("mail/body.txt")
    assert caught.value.line is not None
    assert "syntax error" in caught.value.message


def test_it_reports_a_missing_template(renderer: Renderer) -> None:
    with pytest.raises(TemplateError, match=r"nurture/nope/subject.txt: no such template file"):
        renderer.render("nurture/nope", sample_context())


def test_it_refuses_a_template_name_outside_the_directory(renderer: Renderer) -> None:
    with pytest.raises(TemplateError, match="not a template name"):
        renderer.render("../worker", sample_context())


def test_it_collects_every_problem_when_linting(tmp_path: Path) -> None:
    renderer = make_templates(
        tmp_path,
        {
            "a/subject.txt": "{{ nope }}",
            "a/body.txt": "{{ lead.missing }}",
            "a/body.html": "fine",
            "b/subject.txt": "   ",
            "b/body.txt": "{% for %}",
            "b/body.html": "{{ 1 / 0 }}",
            "c/subject.txt": "ok",
            "c/body.txt": "ok",
            "c/body.html": "ok",
        },
    )
    problems = renderer.lint(sample_context())
    where = sorted((Path(p.file).relative_to(tmp_path).as_posix(), p.message) for p in problems)
    assert [w for w, _ in where] == [
        "a/body.txt",
        "a/subject.txt",
        "b/body.html",
        "b/body.txt",
        "b/subject.txt",
    ]
    assert "ZeroDivisionError" in dict(where)["b/body.html"]
    assert dict(where)["b/subject.txt"] == "the subject is empty"


@pytest.mark.parametrize(
    "expression",
    [
        "''.__class__.__mro__",
        "lead.__init__.__globals__",
        "cycler.__init__.__globals__.os",
        "().__class__.__base__.__subclasses__()",
        "lead.update({'email': 'attacker@example.net'})",
        "lead.custom.clear()",
        "range(10 ** 9) | list",
    ],
)
def test_it_stops_sandbox_escapes(tmp_path: Path, expression: str) -> None:
    renderer = make_templates(tmp_path, one_email(f"before\n{{{{ {expression} }}}}\nafter"))
    ctx: dict[str, Any] = sample_context()
    with pytest.raises(TemplateError) as caught:
        renderer.render("mail", ctx)
    assert caught.value.line == 2
    assert ctx["lead"]["email"] == "maya.patel@northwind-logistics.example"


def test_it_escapes_lead_data_in_html_only(renderer: Renderer) -> None:
    ctx = sample_context(lead={"company": "<script>alert(1)</script>", "first_name": "A&B"})
    email = renderer.render("nurture/welcome", ctx)
    assert "<script>" not in email.html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in email.html
    assert "Hi A&amp;B," in email.html
    assert "<script>alert(1)</script>" in email.text  # plain text is not HTML: no entities
    assert "Hi A&B," in email.text


def test_it_keeps_the_subject_on_one_line(renderer: Renderer) -> None:
    ctx = sample_context(lead={"first_name": "Maya\r\nBcc: victim@example.net\t "})
    subject = renderer.render("nurture/welcome", ctx).subject
    assert "\r" not in subject and "\n" not in subject and "\t" not in subject
    assert subject.startswith("Maya Bcc: victim@example.net , welcome")


def test_an_edited_template_shows_at_once_outside_a_pass_and_at_the_next_pass_within(
    tmp_path: Path,
) -> None:
    renderer = make_templates(tmp_path, one_email("first\n"))
    body = tmp_path / "mail" / "body.txt"

    def edit(text: str, tick: int) -> None:  # a later mtime, as a real edit seconds later has
        body.write_text(text, encoding="utf-8")
        stamp = body.stat().st_mtime + tick
        os.utime(body, (stamp, stamp))

    assert renderer.render("mail", sample_context()).text == "first\n"
    edit("second\n", 10)
    assert renderer.render("mail", sample_context()).text == "second\n"  # an admin's preview
    with renderer.pass_():
        assert renderer.render("mail", sample_context()).text == "second\n"
        edit("third\n", 20)
        # A pass's emails all come from the templates as the pass found them.
        assert renderer.render("mail", sample_context()).text == "second\n"
    with renderer.pass_():
        assert renderer.render("mail", sample_context()).text == "third\n"
    edit("fourth\n", 30)
    assert renderer.render("mail", sample_context()).text == "fourth\n"


def test_rendering_in_steps_gives_what_rendering_at_once_does(renderer: Renderer) -> None:
    ctx = sample_context()
    steps = renderer.render_steps("nurture/welcome", ctx)
    parts = 0
    with pytest.raises(StopIteration) as done:
        while True:
            next(steps)
            parts += 1
    assert parts == 2  # after the subject, after the text
    assert done.value.value == renderer.render("nurture/welcome", ctx)


def test_templates_see_the_environments_globals(tmp_path: Path) -> None:
    renderer = make_templates(tmp_path, one_email("{% for i in range(3) %}{{ i }}{% endfor %}"))
    assert renderer.render("mail", sample_context()).text == "012"
