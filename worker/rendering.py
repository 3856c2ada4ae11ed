"""Email templates: Jinja2 in a sandbox, with undefined variables as errors.

This is the only module that imports jinja2. An email template is a folder under the
templates directory holding `subject.txt`, `body.txt` and `body.html`; bodies extend the
shared `layout.txt` / `layout.html`, which add the unsubscribe footer and postal address.
Every problem a template can have (missing file, syntax error, undefined variable, sandbox
violation, a failing expression) is reported as a TemplateError naming file and line.
"""

from __future__ import annotations

import difflib
import html
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from worker.config import Campaign, Config, SenderConfig
from worker.contexts import KINDS, kinds_of, samples

PARTS = ("subject.txt", "body.txt", "body.html")
_TYPE_MESSAGE = re.compile(r"^'(?P<type>[\w .]+) object' has no attribute '(?P<attr>[^']+)'")
_UNDEFINED_NAME = re.compile(r"^'(?P<name>\w+)' is undefined")


@dataclass(frozen=True)
class RenderedEmail:
    """One rendered email: a single-line subject, a text body and an HTML body."""

    subject: str
    text: str
    html: str


class TemplateError(Exception):
    """A template cannot be rendered; `file` and `line` say where, `message` says why."""

    def __init__(self, file: str, line: int | None, message: str) -> None:
        self.file = file
        self.line = line
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.message}"


class _Undefined(jinja2.StrictUndefined):
    """StrictUndefined that suggests the closest existing key ("did you mean ...?")."""

    __slots__ = ()

    @property
    def _undefined_message(self) -> str:
        message = super()._undefined_message
        obj, name = self._undefined_obj, self._undefined_name
        if isinstance(obj, Mapping) and isinstance(name, str):
            close = difflib.get_close_matches(name, [str(k) for k in obj], n=1)
            if close:
                message += f" (did you mean {close[0]!r}?)"
        return message


def _clean_subject(text: str) -> str:
    """One header-safe line: control characters dropped, whitespace runs collapsed."""
    text = "".join(" " if unicodedata.category(ch) == "Cc" else ch for ch in text)
    return " ".join(text.split())


class Renderer:
    """Renders the email templates found in `templates_dir`."""

    def __init__(self, templates_dir: Path) -> None:
        self.templates_dir = Path(templates_dir)
        # ImmutableSandboxedEnvironment: templates are edited by admins and see lead data;
        # they may read it but never call private attributes or mutate what they are given.
        self._env = ImmutableSandboxedEnvironment(
            # An absolute search path makes Jinja's traceback frames carry absolute file
            # names, which is how _location finds the template line of a runtime error.
            loader=jinja2.FileSystemLoader(self.templates_dir.resolve()),
            undefined=_Undefined,
            autoescape=jinja2.select_autoescape(
                enabled_extensions=("html", "htm"), default_for_string=False, default=False
            ),
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
            auto_reload=True,
        )

    def names(self) -> list[str]:
        """Every email template (a folder holding subject.txt), as "nurture/welcome", sorted."""
        if not self.templates_dir.is_dir():
            return []
        return sorted(
            p.parent.relative_to(self.templates_dir).as_posix()
            for p in self.templates_dir.rglob("subject.txt")
        )

    def render(self, name: str, context: Mapping[str, Any]) -> RenderedEmail:
        """Render template folder `name` with `context`; raise TemplateError on any problem."""
        if not name or name.startswith(("/", ".")) or ".." in name.split("/"):
            raise TemplateError(name or "<empty>", None, "not a template name")
        subject = self._render_part(f"{name}/subject.txt", context)
        return RenderedEmail(
            subject=_clean_subject(subject),
            text=self._render_part(f"{name}/body.txt", context),
            html=self._render_part(f"{name}/body.html", context),
        )

    def lint(
        self,
        context: Mapping[str, Any],
        names: list[str] | None = None,
        must_show: Mapping[str, str] | None = None,
    ) -> list[TemplateError]:
        """Render every part of each template (default: all of them); return every problem.

        Unlike `render`, a broken subject does not hide a broken body: each part is tried.
        `must_show` maps what each body must show to its text (a nurture email's
        unsubscribe link and postal address: the law asks for them). An empty list means
        every template renders with `context`.
        """
        problems: list[TemplateError] = []
        for name in self.names() if names is None else names:
            for part in PARTS:
                where = self._display(f"{name}/{part}")
                try:
                    out = self._render_part(f"{name}/{part}", context)
                except TemplateError as e:
                    problems.append(e)
                    continue
                if part == "subject.txt" and not _clean_subject(out):
                    problems.append(TemplateError(where, None, "the subject is empty"))
                for label, text in (must_show or {}).items() if part != "subject.txt" else ():
                    if text and text not in out and html.escape(text) not in out:
                        problems.append(
                            TemplateError(
                                where, None, f"does not show the {label} (required by law in "
                                "marketing email: keep the layout's footer)"
                            )
                        )  # fmt: skip
        return problems

    # --- internals ---------------------------------------------------------------------

    def _display(self, template: str) -> str:
        """A template's path as a person would type it: relative to the cwd when possible."""
        path = self.templates_dir / template
        try:
            return path.resolve().relative_to(Path.cwd()).as_posix()
        except ValueError:
            return path.as_posix()

    def _render_part(self, template: str, context: Mapping[str, Any]) -> str:
        try:
            return self._env.get_template(template).render(context)
        except jinja2.TemplateSyntaxError as e:
            file = self._display(e.name) if e.name else self._display(template)
            raise TemplateError(file, e.lineno, f"syntax error: {e.message}") from None
        except jinja2.TemplateNotFound as e:
            if e.name == template:
                raise TemplateError(
                    self._display(template), None, "no such template file"
                ) from None
            file, line = self._location(e.__traceback__, template)
            raise TemplateError(file, line, f"includes missing template {e.name!r}") from None
        except SecurityError as e:
            file, line = self._location(e.__traceback__, template)
            raise TemplateError(file, line, f"not allowed in a template: {e}") from None
        except jinja2.UndefinedError as e:
            file, line = self._location(e.__traceback__, template)
            raise TemplateError(
                file, line, self._explain_undefined(str(e), file, line, context)
            ) from None
        # Any other exception here was raised by an expression in the template (1/0,
        # "a" + 1, a filter given bad input): it is the template's problem, so report it
        # with its place instead of letting it take the worker down.
        except Exception as e:
            file, line = self._location(e.__traceback__, template)
            raise TemplateError(file, line, f"{type(e).__name__}: {e}") from None

    def _location(self, tb: TracebackType | None, fallback: str) -> tuple[str, int | None]:
        """The innermost template frame of a rendering traceback: (file, line)."""
        root = str(self.templates_dir.resolve())
        found: tuple[str, int | None] = (self._display(fallback), None)
        while tb is not None:
            filename = tb.tb_frame.f_code.co_filename
            # Jinja rewrites tracebacks so template code shows as frames of the template file.
            if filename.startswith(root) and not filename.endswith(".py"):
                rel = Path(filename).relative_to(root).as_posix()
                found = (self._display(rel), tb.tb_lineno)
            tb = tb.tb_next
        return found

    def _explain_undefined(
        self, message: str, file: str, line: int | None, context: Mapping[str, Any]
    ) -> str:
        """Name the variable instead of its Python type, and suggest a close name."""
        m = _TYPE_MESSAGE.match(message)
        if m and line is not None:
            source = self._source_line(file, line)
            ref = re.search(r"([A-Za-z_][\w.]*)\." + re.escape(m["attr"]) + r"\b", source)
            if ref:
                return f"{ref.group(1)!r} has no attribute {m['attr']!r}{message[m.end() :]}"
        m = _UNDEFINED_NAME.match(message)
        if m:
            close = difflib.get_close_matches(m["name"], [str(k) for k in context], n=1)
            if close:
                return f"{message} (did you mean {close[0]!r}?)"
        return message

    def _source_line(self, file: str, line: int) -> str:
        path = Path(file) if Path(file).is_absolute() else Path.cwd() / file
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError:
            return ""
        return lines[line - 1] if 0 < line <= len(lines) else ""


# --- sample data ---------------------------------------------------------------------------


def sample_context(
    *,
    sender: SenderConfig | None = None,
    lead: Mapping[str, Any] | None = None,
    campaign: Campaign | None = None,
    step: int = 1,
) -> dict[str, Any]:
    """The sample contexts of every kind in one mapping (worker.contexts.samples), for
    rendering a template whatever its kind; lint renders each with its own kind's."""
    by_kind = samples(sender, lead, campaign, step)
    merged: dict[str, Any] = {
        **by_kind["reminder"],
        **by_kind["rep_copy"],
        **by_kind["followup"],
        **by_kind["handoff"],
        **by_kind["nurture"],
    }
    # One `reply` serving every kind: the handoff's, with the copy's and follow-up's keys.
    merged["reply"] = {
        **by_kind["rep_copy"]["reply"],  # type: ignore[typeddict-item]
        **by_kind["followup"]["reply"],  # type: ignore[typeddict-item]
        **merged["reply"],
    }
    return merged


def lint_for(
    renderer: Renderer, config: Config, names: Iterable[str] | None = None
) -> list[TemplateError]:
    """Lint each template with the context of the kind of email the config sends it as
    (sample data, the config's sender), and check that nurture bodies keep the footer."""
    names = renderer.names() if names is None else list(names)
    by_kind = samples(config.sender)
    kinds = kinds_of(config, names)
    footer = {
        "unsubscribe link": str(by_kind["nurture"]["unsubscribe_url"]),  # type: ignore[typeddict-item]
        "postal address": config.sender.postal_address,
    }
    problems: list[TemplateError] = []
    for kind in KINDS:
        group = [n for n in names if kinds[n] == kind]
        if group:
            problems += renderer.lint(by_kind[kind], group, footer if kind == "nurture" else None)
    return problems


# --- the pages of `twoway serve` -------------------------------------------------------------


class Pages:
    """The HTML pages of `twoway serve`: our own templates (worker/pages), autoescaped.

    Not sandboxed like email templates: these ship with twoway and admins do not edit them.
    """

    def __init__(self) -> None:
        self._env = jinja2.Environment(
            loader=jinja2.PackageLoader("worker", "pages"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )

    def render(self, template: str, /, **context: Any) -> str:
        context.setdefault("nav", False)
        context.setdefault("flash", None)
        context.setdefault("csrf", "")
        return self._env.get_template(template).render(**context)

    def static(self, name: str) -> str:
        """A static file beside the pages (the style sheet)."""
        source = self._env.loader.get_source(self._env, name)[0] if self._env.loader else ""
        return source
