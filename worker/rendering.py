"""Email templates: Jinja2 in a sandbox, with undefined variables as errors.

This is the only module that imports jinja2. An email template is a folder under the
templates directory holding `subject.txt`, `body.txt` and `body.html`; bodies extend the
shared `layout.txt` / `layout.html`, which add the unsubscribe footer and postal address.
Every problem a template can have (missing file, syntax error, undefined variable, sandbox
violation, a failing expression, a render limit exceeded) is reported as a TemplateError
naming file and line.

Render limits (`RenderLimits`): a template is code its admin writes, so each part (subject,
text body, HTML body) is rendered under a budget of steps (loop iterations, calls, lookups,
filters), of characters written, of the size of any one value it builds, and of time. The
sandbox counts them as it goes, so a runaway template stops at the limit instead of taking
the machine's memory: every loop's iterable is wrapped in a counting generator, every
written piece of output is counted where it is written (also inside macros, `{% set %}`
blocks and blocks re-emitted by `super()`), and the calls, operators and filters that can
multiply a value's size (`'x' * n`, `**`, `~`, `center`, `join`, `replace`, `%` ...) are
checked before they run.
"""

from __future__ import annotations

import contextvars
import difflib
import functools
import html
import inspect
import itertools
import re
import string
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from worker.config import Campaign, Config, SenderConfig
from worker.contexts import KINDS, kinds_of, samples
from worker.steps import Steps, drain

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


# --- render limits -------------------------------------------------------------------------


@dataclass(frozen=True)
class RenderLimits:
    """What one part of one email (its subject, text or HTML body) may cost to render.

    `steps`: loop iterations, calls, attribute and item lookups, filters and operators;
    `chars`: characters written, counted where each piece of output is written (text a
    macro or `super()` re-emits counts again), plus the length of every string or list a
    call, filter or operator returns (what the render allocates); `value`: the length of
    any one string, list or mapping a template builds; `int_bits`: the size of a number it
    computes; `seconds`: wall-clock time; `file_bytes`: the size of a template file;
    `subject_chars`: the rendered subject (one header line: folding a longer one costs
    time that grows with the square of its length).
    """

    steps: int = 1_000_000
    chars: int = 2_000_000
    value: int = 1_000_000
    int_bits: int = 10_000
    seconds: float = 5.0
    file_bytes: int = 1_000_000
    subject_chars: int = 998


class RenderLimitExceeded(Exception):
    """A template went past one of its RenderLimits; the message says which and how."""


class _Budget:
    """What is left of the limits of the part being rendered (one per part, per thread)."""

    __slots__ = ("chars", "deadline", "limits", "steps")

    def __init__(self, limits: RenderLimits) -> None:
        self.limits = limits
        self.steps = limits.steps
        self.chars = limits.chars
        self.deadline = time.monotonic() + limits.seconds

    def step(self) -> None:
        self.steps -= 1
        if self.steps < 0:
            raise RenderLimitExceeded(
                f"does more than {self.limits.steps:,} steps (loop iterations, calls, "
                "lookups and filters)"
            )
        # The clock every 64 steps: a step is far under a millisecond, the limit seconds.
        if (self.steps & 63 == 0 or self.limits.seconds <= 0) and time.monotonic() > self.deadline:
            raise RenderLimitExceeded(f"takes longer than {self.limits.seconds:g} s")

    def write(self, n: int) -> None:
        """Count `n` characters written or built (a list counts its items)."""
        self.chars -= n
        if self.chars < 0:
            raise RenderLimitExceeded(
                f"writes or builds more than {self.limits.chars:,} characters"
            )
        self.step()

    def size(self, n: int, what: str = "a value") -> None:
        """Refuse to build `what` of `n` characters or items when that is over the limit."""
        if n > self.limits.value:
            raise RenderLimitExceeded(
                f"builds {what} of {n:,} characters or items (at most {self.limits.value:,})"
            )

    def number(self, bits: int) -> None:
        if bits > self.limits.int_bits:
            raise RenderLimitExceeded(
                f"computes a number of about {bits:,} bits (at most {self.limits.int_bits:,})"
            )

    def checked(self, value: Any) -> Any:
        """`value`, once it is known to be within the size limits; a new string or
        collection is counted as built (so that a million small values are caught too)."""
        if isinstance(value, str | bytes | list | tuple | dict | set | frozenset):
            self.size(len(value))
            self.write(len(value))
        elif isinstance(value, int) and not isinstance(value, bool):
            self.number(value.bit_length())
        return value

    def iterate(self, iterable: Iterable[Any]) -> Iterator[Any]:
        for item in iterable:
            self.step()
            yield item


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar(
    "twoway_render_budget", default=None
)


def _budget() -> _Budget:
    budget = _BUDGET.get()
    # Outside Renderer._render_part (Jinja folding a constant while it compiles a template
    # elsewhere): each call is checked on its own, and nothing is carried over.
    return budget if budget is not None else _Budget(RenderLimits())


# printf-style conversions: a width or precision that would pad a value to millions of
# characters. Linear: the mapping key and the flags cannot contain "%", so no two matches
# overlap.
_PRINTF_SPEC = re.compile(r"%(?:\([^)%]*\))?[-#0 +]*(\d+|\*)?(?:\.(\d+|\*))?")
_DIGITS = re.compile(r"\d+")


def _width(digits: str) -> int:
    """A width or precision written in digits (any over a trillion counts as a trillion)."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 12 else 10**12


def _check_printf(budget: _Budget, fmt: str, args: Any) -> None:
    values = args if isinstance(args, tuple) else (args,)
    star = False
    for m in _PRINTF_SPEC.finditer(fmt):
        for group in m.groups():
            if group == "*":
                star = True
            elif group:
                budget.size(_width(group), "a padded value")
    if star:
        for v in values:
            if isinstance(v, int):
                budget.size(v, "a padded value")


def _check_format(budget: _Budget, fmt: str, args: tuple[Any, ...], kwargs: Any) -> None:
    """str.format: no width or precision in a format spec may reach the size limit."""
    try:
        fields = list(string.Formatter().parse(fmt))
    except ValueError:
        return  # str.format itself reports the bad format string
    for _literal, _name, spec, _conversion in fields:
        if not spec:
            continue
        for digits in _DIGITS.findall(spec):
            budget.size(_width(digits), "a padded value")
        if "{" in spec:  # a computed width: look at the numbers it could come from
            values = [*args, *(kwargs.values() if isinstance(kwargs, Mapping) else ())]
            for v in values:
                if isinstance(v, int):
                    budget.size(v, "a padded value")


def _replaced_size(s: str, old: str, new: str, count: int | None) -> int:
    found = len(s) + 1 if not old else s.count(old)
    if count is not None and count >= 0:
        found = min(found, count)
    return len(s) + found * max(0, len(new) - len(old))


def _check_str_method(
    budget: _Budget, s: str, name: str, args: tuple[Any, ...], kwargs: Any
) -> None:
    """A str method whose result can be far larger than its inputs (`'x'.center(10**9)`)."""
    first = args[0] if args else None
    if name in ("center", "ljust", "rjust", "zfill") and isinstance(first, int):
        budget.size(first, f"a {name}() result")
    elif name == "expandtabs":
        size = first if isinstance(first, int) else int(kwargs.get("tabsize", 8))
        budget.size(len(s) + s.count("\t") * max(size, 0), "an expandtabs() result")
    elif name == "replace" and len(args) >= 2:
        count = args[2] if len(args) > 2 else kwargs.get("count")
        if isinstance(args[0], str) and isinstance(args[1], str):
            budget.size(_replaced_size(s, args[0], args[1], count), "a replace() result")
    elif name in ("format", "format_map"):
        _check_format(
            budget, s, args if name == "format" else (), kwargs if name == "format" else first
        )


def _check_binop(budget: _Budget, operator: str, left: Any, right: Any) -> None:
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    sized = (str, bytes, list, tuple)
    if operator == "*":
        if is_int(left) and isinstance(right, sized):
            left, right = right, left
        if isinstance(left, sized) and is_int(right):
            budget.size(len(left) * max(right, 0), "a repeated value")
        elif is_int(left) and is_int(right):
            budget.number(left.bit_length() + right.bit_length())
    elif operator == "**":
        if is_int(left) and is_int(right) and right > 0 and abs(left) > 1:
            budget.number(left.bit_length() * right)
    elif operator == "+":
        if isinstance(left, sized) and isinstance(right, sized):
            budget.size(len(left) + len(right))
    elif operator == "%" and isinstance(left, str):
        _check_printf(budget, left, right)


def _guard_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """`func` counted as a step, its result checked, and for the filters that can make a
    value much larger than their input, the size worked out before they run."""
    signature = None
    # Jinja passes a context, eval context or environment first to the filters marked so
    # (async variants are marked whatever the sync function's own parameters).
    passes = hasattr(func, "jinja_pass_arg")
    if name in _AMPLIFYING:
        signature = inspect.signature(func)
        params = list(signature.parameters.values())
        if params and params[0].name in ("context", "eval_ctx", "environment", "env"):
            signature = signature.replace(parameters=params[1:])

    @functools.wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.step()
        if signature is not None:
            head, rest = (args[:1], args[1:]) if passes else ((), args)
            bound = signature.bind(*rest, **kwargs)
            _check_filter(budget, name, bound.arguments)
            args, kwargs = (*head, *bound.args), bound.kwargs
        return budget.checked(func(*args, **kwargs))

    return guarded


_AMPLIFYING = frozenset(
    {
        "center",
        "indent",
        "wordwrap",
        "replace",
        "join",
        "batch",
        "slice",
        "format",
        "tojson",
        "lipsum",
    }
)


def _check_filter(budget: _Budget, name: str, a: dict[str, Any]) -> None:
    """Check one amplifying filter's arguments (`a`, by parameter name; may rebind them)."""
    s = a.get("s", a.get("value"))
    text = s if isinstance(s, str) else ""
    if name == "center" and isinstance(a.get("width"), int):
        budget.size(a["width"], "a centred value")
    elif name == "indent":
        width = a.get("width", 4)
        pad = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        budget.size(len(text) + (text.count("\n") + 1) * max(pad, 0), "an indented value")
    elif name == "wordwrap":
        width = a.get("width", 79)
        wrap = a.get("wrapstring") or "\n"
        lines = text.count("\n") + 1 + len(text) // max(width if isinstance(width, int) else 1, 1)
        budget.size(len(text) + lines * len(str(wrap)), "a wrapped value")
    elif name == "replace" and isinstance(a.get("old"), str) and isinstance(a.get("new"), str):
        count = a.get("count")
        budget.size(
            _replaced_size(str(s), a["old"], a["new"], count if isinstance(count, int) else None),
            "a replaced value",
        )
    elif name == "join":
        items = list(budget.iterate(s)) if isinstance(s, Iterable) else []
        a["value"] = items
        sep = len(str(a.get("d", "")))
        budget.size(
            sum(len(x) if isinstance(x, str) else 20 for x in items) + sep * len(items),
            "a joined value",
        )
    elif name in ("batch", "slice"):
        n = a.get("linecount", a.get("slices"))
        if isinstance(n, int) and n > budget.limits.value:
            raise RenderLimitExceeded(
                f"asks {name}() for {n:,} parts (at most {budget.limits.value:,})"
            )
    elif name == "format" and isinstance(s, str):
        _check_printf(budget, s, tuple(a.get("args", ())) or a.get("kwargs", {}))
    elif name == "tojson":
        indent = a.get("indent")
        if (
            isinstance(indent, int | str)
            and (len(indent) if isinstance(indent, str) else indent) > 16
        ):
            raise RenderLimitExceeded("tojson's indent is at most 16")


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    _budget().size(n * max * 12, "lorem ipsum")
    return jinja2.utils.generate_lorem_ipsum(n, html, min, max)


@jinja2.pass_context
def _count_written(_context: Any, value: Any) -> Any:
    """One piece of output about to be written: counted against the part's budget."""
    budget = _budget()
    if isinstance(value, str):
        budget.write(len(value))
    elif not isinstance(value, jinja2.Undefined) and not hasattr(value, "__html__"):
        value = str(value)
        budget.write(len(value))
    return value


@jinja2.pass_context
def _count_loop(_context: Any, iterable: Any) -> Any:
    """A loop's iterable, each iteration counted as a step."""
    return _budget().iterate(iterable)


@jinja2.pass_context
def _check_joined(_context: Any, value: Any) -> Any:
    """The result of `~`: no longer than a value may be."""
    return _budget().checked(value)


_WRITTEN, _LOOP, _JOINED = "_twoway_written", "_twoway_loop", "_twoway_joined"


def _wrap(node: nodes.Node, name: str) -> nodes.Filter:
    assert isinstance(node, nodes.Expr)  # what an Output, a loop and `~` hold
    return nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)


class _Counting(NodeTransformer):
    """Rewrites a parsed template so that its output, loops and `~` go through the budget."""

    def visit_Output(self, node: nodes.Output) -> nodes.Node:
        self.generic_visit(node)
        node.nodes = [_wrap(child, _WRITTEN) for child in node.nodes]
        return node

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = _wrap(node.iter, _LOOP)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return _wrap(node, _JOINED)


class _CountingCodeGenerator(CodeGenerator):
    def visit_Template(self, node: nodes.Template, frame: Frame | None = None) -> None:
        _Counting().visit(node)
        super().visit_Template(node, frame)


class _LimitedEnvironment(ImmutableSandboxedEnvironment):
    """The email templates' sandbox, with every step, output and growth counted."""

    code_generator_class = _CountingCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.filters = {name: _guard_filter(name, f) for name, f in self.filters.items()}
        self.filters[_WRITTEN] = _count_written
        self.filters[_LOOP] = _count_loop
        self.filters[_JOINED] = _check_joined
        self.globals["lipsum"] = _lipsum

    def make_globals(self, d: MutableMapping[str, Any] | None) -> MutableMapping[str, Any]:
        # A template's globals as one dict instead of Jinja's ChainMap over the
        # environment's, which every rendering copies key by key into its context. These
        # globals are set once, above, before any template loads.
        return {**self.globals, **(d or {})}

    def call_binop(
        self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any
    ) -> Any:
        budget = _budget()
        budget.step()
        _check_binop(budget, operator, left, right)
        return budget.checked(self.binop_table[operator](left, right))

    def call(
        __self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any
    ) -> Any:
        budget = _budget()
        budget.step()
        target = getattr(__obj, "__wrapped__", __obj)  # the sandbox's str.format wrapper
        owner = getattr(target, "__self__", None)
        if isinstance(owner, str):
            _check_str_method(budget, owner, getattr(target, "__name__", ""), args, kwargs)
            if getattr(target, "__name__", "") == "join" and args:
                args = (list(budget.iterate(args[0])), *args[1:])
                budget.size(
                    sum(len(x) if isinstance(x, str) else 0 for x in args[0])
                    + len(owner) * len(args[0]),
                    "a joined value",
                )
        return budget.checked(super().call(__context, __obj, *args, **kwargs))

    def getattr(self, obj: Any, attribute: str) -> Any:
        _budget().step()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _budget().step()
        return super().getitem(obj, argument)


class _SizedLoader(jinja2.FileSystemLoader):
    """A FileSystemLoader that refuses a template file over the size limit before reading it."""

    def __init__(self, searchpath: Path, max_bytes: int) -> None:
        super().__init__(searchpath)
        self.max_bytes = max_bytes

    def get_source(
        self, environment: jinja2.Environment, template: str
    ) -> tuple[str, str, Callable[[], bool]]:
        for root in self.searchpath:
            path = Path(root, *template.split("/"))
            try:
                size = path.stat().st_size
            except OSError:
                continue
            if size > self.max_bytes:
                raise RenderLimitExceeded(
                    f"the template file {template} is {size:,} bytes (at most {self.max_bytes:,})"
                )
            break
        source, filename, uptodate = super().get_source(environment, template)
        checked = _PASS.get()

        def fresh() -> bool:
            # Jinja asks before each use of a loaded template whether its file changed (a
            # stat): within a pass (see Renderer.pass_), once.
            nonlocal checked
            now = _PASS.get()
            if now and checked == now:
                return True
            unchanged = uptodate()
            checked = now if unchanged else 0
            return unchanged

        return source, filename, fresh


# The pass a thread renders in (Renderer.pass_); 0 outside one.
_PASS: contextvars.ContextVar[int] = contextvars.ContextVar("twoway_render_pass", default=0)
_PASSES = itertools.count(1)


class Renderer:
    """Renders the email templates found in `templates_dir`, each part within `limits`."""

    def __init__(self, templates_dir: Path, limits: RenderLimits | None = None) -> None:
        self.templates_dir = Path(templates_dir)
        self.limits = limits or RenderLimits()
        # An immutable sandbox: templates are edited by admins and see lead data; they may
        # read it but never call private attributes or mutate what they are given, and
        # they render within self.limits.
        self._env = _LimitedEnvironment(
            # An absolute search path makes Jinja's traceback frames carry absolute file
            # names, which is how _location finds the template line of a runtime error.
            loader=_SizedLoader(self.templates_dir.resolve(), self.limits.file_bytes),
            undefined=_Undefined,
            autoescape=jinja2.select_autoescape(
                enabled_extensions=("html", "htm"), default_for_string=False, default=False
            ),
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
            auto_reload=True,
        )

    @contextmanager
    def pass_(self) -> Iterator[None]:
        """Within the block, each template file is checked for changes once, when it is
        first used, instead of at every rendering: a send pass's emails come from the
        templates as they were when it began. An edit shows at the next pass."""
        token = _PASS.set(next(_PASSES))
        try:
            yield
        finally:
            _PASS.reset(token)

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
        return drain(self.render_steps(name, context))

    def render_steps(self, name: str, context: Mapping[str, Any]) -> Steps[RenderedEmail]:
        """`render` a part at a time: the generator pauses after the subject and after the
        text, and returns the RenderedEmail (see `drain`)."""
        if not name or name.startswith(("/", ".")) or ".." in name.split("/"):
            raise TemplateError(name or "<empty>", None, "not a template name")
        subject = _clean_subject(self._render_part(f"{name}/subject.txt", context))
        problem = self._subject_problem(f"{name}/subject.txt", subject)
        if problem is not None and subject:  # an empty subject is lint's warning only
            raise problem
        yield
        text = self._render_part(f"{name}/body.txt", context)
        yield
        return RenderedEmail(subject, text, self._render_part(f"{name}/body.html", context))

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
                if part == "subject.txt":
                    problem = self._subject_problem(f"{name}/{part}", _clean_subject(out))
                    if problem is not None:
                        problems.append(problem)
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

    def _subject_problem(self, template: str, subject: str) -> TemplateError | None:
        if not subject:
            return TemplateError(self._display(template), None, "the subject is empty")
        if len(subject) > self.limits.subject_chars:
            return TemplateError(
                self._display(template),
                None,
                f"exceeds a render limit: the subject is {len(subject):,} characters "
                f"(at most {self.limits.subject_chars:,})",
            )
        return None

    def _display(self, template: str) -> str:
        """A template's path as a person would type it: relative to the cwd when possible."""
        path = self.templates_dir / template
        try:
            return path.resolve().relative_to(Path.cwd()).as_posix()
        except ValueError:
            return path.as_posix()

    def _render_part(self, template: str, context: Mapping[str, Any]) -> str:
        token = _BUDGET.set(_Budget(self.limits))
        try:
            return self._env.get_template(template).render(context)
        except RenderLimitExceeded as e:
            file, line = self._location(e.__traceback__, template)
            raise TemplateError(file, line, f"exceeds a render limit: {e}") from None
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
        finally:
            _BUDGET.reset(token)

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
