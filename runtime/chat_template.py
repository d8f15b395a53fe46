"""Chat templates: a model's Jinja, code from a stranger, rendered in a sandbox that bounds its work and its output.

jinja2's ImmutableSandboxedEnvironment keeps a template away from Python internals and from changing its inputs; it
bounds neither time nor size. Here every call, filter, operator and loop iteration is a step, counted against
MAX_STEPS and a wall-clock deadline (the backstop for a step that is slow in itself). A value that can outgrow its
inputs (repetition, widths, joins, formats, literals of many references) is sized before it is made; every value
made is measured after: none may exceed `limit` characters, nor the output, nor their total MADE_SHARE times that.
`limit` is LIMIT_FLOOR plus a multiple of the inputs' own size, so a long conversation renders whatever its length.
"""

from __future__ import annotations

import json
import re
import sys
import time
from datetime import datetime

import jinja2
import jinja2.compiler
import jinja2.ext
import jinja2.nodes as nodes
import jinja2.runtime
import jinja2.sandbox
import jinja2.utils

from .errors import MoeError

MAX_SOURCE = 256_000  # characters of template source (Hub templates are a few kB)
MAX_STEPS = 1_000_000  # calls, filters, operators and loop iterations per render
MAX_SECONDS = 2.0  # a render takes milliseconds; this is far past any template that means well
MAX_RANGE = 100_000  # items of one range(), as jinja2's own sandbox allows
LIMIT_FLOOR = 1_000_000  # characters any value or the output may hold, plus INPUT_SHARE times the inputs' size
INPUT_SHARE = 4
MADE_SHARE = 16  # characters (and container slots) made in all, as a multiple of `limit`
UNSAFE = "the template is unsafe or broken; do not use it"


class _Refused(Exception):
    """The template went past one of its bounds."""


def _text_size(value, limit: float) -> int:
    """About how many characters `value` becomes as text (a container as its repr), counted up to just past `limit`."""
    if isinstance(value, str):
        return len(value)  # most values: first, and fast
    size, todo = 0, [value]
    while todo and size <= limit:
        v = todo.pop()
        if isinstance(v, (str, bytes)):
            size += len(v)
        elif isinstance(v, int):
            size += v.bit_length() // 3 + 1  # decimal digits, a little over
        elif isinstance(v, dict):
            size += 2 + 4 * len(v)
            todo.extend(v.items())
        elif isinstance(v, (list, tuple, set, frozenset, type({}.keys()), type({}.values()), type({}.items()))):
            size += 2 + 4 * len(v)  # brackets, quotes and separators
            todo.extend(v)
        else:
            size += 8  # None, floats, and jinja's objects (their repr is short: see _Namespace)
    return size


def _size(value) -> int:
    return _text_size(value, float("inf"))


def _width(value) -> int:
    """Characters a width argument stands for: an int itself, a string its length (indent takes either)."""
    if isinstance(value, bool):
        return 0
    return value if isinstance(value, int) else len(value) if isinstance(value, str) else 0


def _format_size(fmt, values) -> int:
    """Most characters `fmt % values` or `fmt.format(...)` makes: each field at most four times (escapes of !r)
    its largest value, or the widest width written in `fmt` or passed as a number."""
    fmt = str(fmt)
    widths = [10 ** min(len(digits), 12) for digits in re.findall(r"\d+", fmt)]
    widest = max([4 * _size(v) for v in values] + [_width(v) for v in values] + widths + [0])
    return len(fmt) + (fmt.count("%") + fmt.count("{")) * widest


def _join_size(items: list, sep) -> int:
    return sum(_size(i) for i in items) + len(items) * _width(str(sep))


def _replace_size(s, old="", new="", *_, **__) -> int:
    return _size(s) + (_size(s) + 1) * _width(str(new))


def _padded(s, width=80, *_) -> int:
    return max(_size(s), _width(width))


# Upper bounds on the characters a call makes, for those whose output can outgrow their inputs.
# Filters, by name; their first argument is the value filtered.
FILTER_SIZES = {
    "center": _padded,
    "indent": lambda s, width=4, *_, **__: len(s) + (s.count("\n") + 1) * _width(width) if isinstance(s, str) else 0,
    "wordwrap": lambda s, width=79, long=True, wrapstring=None, *_, **__: (_size(s) + 1) * (1 + _width(wrapstring or "\n")),
    "format": lambda fmt, *args, **kwargs: _format_size(fmt, [*args, *kwargs.values()]),
    "replace": _replace_size,
    "join": lambda items, d="", *_: _join_size(items, d),
    "batch": lambda value, linecount, fill_with=None: _size(value) + _width(linecount),
    "slice": lambda value, slices, fill_with=None: _size(value) + _width(slices),
    "sum": lambda items, attribute=None, start=0: 0 if isinstance(start, (int, float)) else len(items) * _size(items),
    # the indent string is made once per nesting level; tojson counts what it writes as it writes it
    "tojson": lambda value, ensure_ascii=False, indent=None, *_, **__: _width(indent) * (_size(value) + 1),
}
# Methods of str, bytes and int, by name; their first argument is the object.
METHOD_SIZES = {
    "center": _padded, "ljust": _padded, "rjust": _padded, "zfill": _padded,
    "expandtabs": lambda s, tabsize=8: len(s) * max(_width(tabsize), 1),
    "replace": _replace_size,
    "translate": lambda s, table: len(s) * max([_width(v) if isinstance(v, str) else 1 for v in table.values()] + [1]),
    "join": lambda sep, items: _join_size(items, sep),
    "format": lambda fmt, *args, **kwargs: _format_size(fmt, [*args, *kwargs.values()]),
    "format_map": lambda fmt, mapping: _format_size(fmt, list(mapping.values())),
    "to_bytes": lambda n, length=1, *_, **__: _width(length),
}
MATERIALIZED = {"join", "sum"}  # these take an iterable: made a list first, so it can be sized and still used


def _binop_size(op: str, left, right) -> int:
    """Characters (or decimal digits) an operator makes, for those whose result can outgrow their operands."""
    sequences = (str, bytes, list, tuple)
    if op == "+" and isinstance(left, sequences) and isinstance(right, sequences):
        return _size(left) + _size(right)
    if op == "*" and isinstance(left, int) and isinstance(right, int):
        return (left.bit_length() + right.bit_length()) // 3 + 1
    if op == "*" and isinstance(left, int) and isinstance(right, sequences):
        left, right = right, left
    if op == "*" and isinstance(left, sequences) and isinstance(right, int):
        return _size(left) * max(right, 0)
    if op == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
        return left.bit_length() * right // 3 + 1
    if op == "%" and isinstance(left, str):
        values = right if isinstance(right, tuple) else list(right.values()) if isinstance(right, dict) else [right]
        return _format_size(left, values)
    return 0


class _Namespace(jinja2.utils.Namespace):
    """namespace(), printed short: its attributes, set one by one, could otherwise print as many times the limit."""

    def __repr__(self) -> str:
        return "<Namespace>"


class _CodeGenerator(jinja2.compiler.CodeGenerator):
    """Routes what jinja2 compiles to plain Python through the environment, where it is counted:
    each loop's items, `~`, and list, tuple and dict literals (a literal of many references to one long string)."""

    def visit_For(self, node, frame):
        node.iter = nodes.Call(nodes.EnvironmentAttribute("counted"), [node.iter], [], None, None, lineno=node.lineno)
        super().visit_For(node, frame)

    def visit_Concat(self, node, frame):
        self.write("environment.concat_values((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def visit_List(self, node, frame):
        self._made(super().visit_List, node, frame)

    def visit_Dict(self, node, frame):
        self._made(super().visit_Dict, node, frame)

    def visit_Tuple(self, node, frame):
        if node.ctx == "load":
            self._made(super().visit_Tuple, node, frame)
        else:
            super().visit_Tuple(node, frame)  # an assignment's targets

    def _made(self, visit, node, frame):
        self.write("environment.made(")
        visit(node, frame)
        self.write(")")


class _Sandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """The immutable sandbox with a budget for one render; reaching for an unsafe attribute is an error rather
    than a silent undefined."""

    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset({"+", "*", "%", "**"})

    def __init__(self, limit: int):
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols],
                         finalize=self.made)
        self.limit = limit
        self.steps = 0
        self.total = 0
        self.deadline = time.monotonic() + MAX_SECONDS
        self.filters = {name: self._guarded(name, f) for name, f in {**self.filters, "tojson": self.tojson}.items()}
        self.globals.update(range=self.range, lipsum=self.lipsum, namespace=_Namespace,
                            raise_exception=_raise_exception, strftime_now=_strftime_now)

    # ---- the budget
    def step(self) -> None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise _Refused(f"its work exceeds {MAX_STEPS:,} steps (loop iterations, calls, filters, operators)")
        if time.monotonic() > self.deadline:
            raise _Refused(f"rendering exceeds {MAX_SECONDS:g} s")

    def allow(self, size: int, what: str) -> None:
        if size > self.limit:
            raise _Refused(f"{what} makes {size:,} characters, which exceeds the limit of {self.limit:,}")

    def made(self, value, what: str = "a value"):
        """Count a value made: its size as text within the limit, and the running total of sizes."""
        self.allow(_text_size(value, self.limit), what)
        self.total += len(value) if isinstance(value, (str, bytes, list, tuple, dict)) else 1
        if self.total > MADE_SHARE * self.limit:
            raise _Refused(f"the values it makes exceed {MADE_SHARE * self.limit:,} characters in all")
        return value

    # ---- where jinja2 lets a sandbox in
    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's spelling, so no keyword clashes)
        __self.step()
        if isinstance(__obj, jinja2.runtime.LoopContext) and args:  # loop(children) in a recursive loop
            args = (__self.counted(args[0]), *args[1:])
        method = getattr(__obj, "__wrapped__", __obj)  # str.format comes wrapped by the sandbox
        owner, name = getattr(method, "__self__", None), getattr(method, "__name__", "")
        if isinstance(owner, (str, bytes, int)) and name in METHOD_SIZES:
            if name in MATERIALIZED and args:
                args = (list(args[0]), *args[1:])
            __self.allow(METHOD_SIZES[name](owner, *args, **kwargs), f"{type(owner).__name__}.{name}()")
        return __self.made(super().call(__context, __obj, *args, **kwargs), "a call")

    def call_binop(self, context, operator, left, right):
        self.step()
        self.allow(_binop_size(operator, left, right), f"the {operator} operator")
        return self.made(super().call_binop(context, operator, left, right), f"the {operator} operator")

    def concat(self, pieces, what: str = "its output") -> str:
        """The output, and every macro's and block's: streamed in and counted as it comes."""
        kept, size = [], 0
        for piece in pieces:
            size += len(piece)
            self.allow(size, what)
            kept.append(piece)
        return "".join(kept)

    def _guarded(self, name: str, f):
        pass_arg = getattr(f, "jinja_pass_arg", None)  # the context or environment jinja2 passes first
        offset = 1 if pass_arg else 0
        sized = FILTER_SIZES.get(name)

        def filtered(*args, **kwargs):
            self.step()
            if name in MATERIALIZED and len(args) > offset:
                args = (*args[:offset], list(args[offset]), *args[offset + 1:])
            if sized is not None:
                self.allow(sized(*args[offset:], **kwargs), f"filter {name}")
            return self.made(f(*args, **kwargs), f"filter {name}")

        if pass_arg:
            filtered.jinja_pass_arg = pass_arg
        return filtered

    # ---- what the compiled template calls
    def counted(self, iterable):
        """A loop's items, one step each."""
        for item in iterable:
            self.step()
            yield item

    def concat_values(self, values) -> str:
        """`a ~ b`: sized before it is joined."""
        self.step()
        self.allow(sum(_text_size(v, self.limit) for v in values), "the ~ operator")
        return self.made("".join(map(str, values)), "the ~ operator")

    def range(self, *args) -> range:
        items = range(*args)
        if len(items) > MAX_RANGE:
            raise _Refused(f"range() of {len(items):,} items exceeds the limit of {MAX_RANGE:,}")
        return items

    def lipsum(self, n=5, html=True, min=20, max=100) -> str:  # noqa: A002 (jinja2's argument names)
        self.allow(_width(n) * _width(max) * 12, "lipsum()")  # words of at most 11 letters and a space
        return jinja2.utils.generate_lorem_ipsum(n, html, min, max)

    def tojson(self, value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        """json.dumps as Hub templates expect (not jinja2's HTML-escaping tojson), counted as it is written."""
        encoder = json.JSONEncoder(ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
        return self.concat(encoder.iterencode(value), "filter tojson")

    def unsafe_undefined(self, obj, attribute):
        raise jinja2.sandbox.SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


class _TemplateRaised(Exception):
    """raise_exception() called by the template itself."""


def _raise_exception(message):
    raise _TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def render_chat_template(template: str, messages: list[dict], **variables) -> str:
    """Render a Hub chat template; any failure, including an escape attempt or a bound passed, is a MoeError."""
    if len(template) > MAX_SOURCE:
        raise MoeError(f"chat template: its {len(template):,} characters exceed the limit of {MAX_SOURCE:,}; {UNSAFE}")
    inputs = _size([messages, variables])
    try:
        env = _Sandbox(LIMIT_FLOOR + INPUT_SHARE * inputs)
        return env.from_string(template).render(messages=messages, **variables)
    except _Refused as exc:
        raise MoeError(f"chat template: {exc}; {UNSAFE}") from None
    except jinja2.sandbox.SecurityError as exc:
        raise MoeError(f"chat template refused by the sandbox: {exc}; {UNSAFE}") from None
    except _TemplateRaised as exc:
        raise MoeError(f"chat template: {_one_line(exc)}") from None
    except jinja2.TemplateSyntaxError as exc:
        raise MoeError(f"chat template: syntax error on line {exc.lineno}: {exc.message}") from None
    except SyntaxError as exc:  # jinja2 parsed it but Python refused what it compiled to (a stray {% break %})
        raise MoeError(f"chat template: syntax error: {exc.msg}") from None
    except jinja2.TemplateError as exc:
        raise MoeError(f"chat template: {_one_line(exc)}") from None
    except RecursionError:
        raise MoeError(f"chat template: its recursion exceeds {sys.getrecursionlimit():,} levels; {UNSAFE}") from None
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, ArithmeticError, MemoryError) as exc:
        raise MoeError(f"chat template failed: {type(exc).__name__}: {_one_line(exc)}") from None


def _one_line(exc: Exception, most: int = 300) -> str:
    """An exception's message as one line of at most `most` characters (a template writes its own messages)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= most else text[: most - 1] + "…"
