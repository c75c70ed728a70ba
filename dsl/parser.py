"""Parse .attn text into the AST with lark's LALR parser, keeping source spans and comments."""

from __future__ import annotations

import contextvars
import re
import threading
from functools import lru_cache
from importlib import resources

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import (
    UnexpectedCharacters,
    UnexpectedEOF,
    UnexpectedInput,
    UnexpectedToken,
    VisitError,
)

from . import nodes as N
from .builtins import KEYWORDS
from .errors import AttncError, Diagnostic, register_source

# Deeper expressions are almost surely machine-made; refusing them keeps every recursive pass
# (transformer, checker, formatter, evaluator) far from Python's recursion limit.
MAX_DEPTH = 200

_local = threading.local()


def _collect_comment(tok: Token) -> Token:
    _local.comments.append(tok)
    return tok


@lru_cache(maxsize=1)
def _parser() -> Lark:
    grammar = resources.files(__package__).joinpath("attn.lark").read_text()
    return Lark(
        grammar,
        parser="lalr",
        lexer="contextual",
        propagate_positions=True,
        maybe_placeholders=True,
        lexer_callbacks={"COMMENT": _collect_comment},
    )


# Friendly names for terminals in "expected ..." messages.
_TOKEN_NAMES = {
    "NAME": "a name",
    "INT": "an integer",
    "FLOAT": "a number",
    "STRING": 'a string ("...")',
    "COMP_OP": "a comparison",
    "ADD_OP": "'+' or '-'",
    "MUL_OP": "'*', '/', '//' or '%'",
    "POW": "'**'",
    "LPAR": "'('",
    "RPAR": "')'",
    "LBRACE": "'{'",
    "RBRACE": "'}'",
    "COMMA": "','",
    "COLON": "':'",
    "EQUAL": "'='",
    "DOT": "'.'",
    "BANG": "'!'",
    "AMPERSAND": "'&'",
    "VBAR": "'|'",
    "$END": "end of file",
}
_EXPR_START = {"NAME", "INT", "FLOAT", "LPAR", "BANG", "ADD_OP", "TRUE", "FALSE"}
_OPERATORS = {"COMP_OP", "ADD_OP", "MUL_OP", "POW", "AMPERSAND", "VBAR", "IN", "DOT", "LPAR"}


def _token_name(term: str) -> str:
    if term in _TOKEN_NAMES:
        return _TOKEN_NAMES[term]
    try:
        pattern = _parser().get_terminal(term).pattern
    except KeyError:
        return term.lower()
    if pattern.type == "str":
        return f"'{pattern.value}'"
    return term.lower()


def _describe_expected(expected: set[str]) -> str:
    expected = {e for e in expected if not e.startswith("__")}
    names: list[str] = []
    if len(expected & _EXPR_START) >= 4:
        names.append("an expression")
        expected = expected - _EXPR_START
    elif len(expected & _OPERATORS) >= 4:
        names.append("an operator")
        expected = expected - _OPERATORS
    names += sorted(_token_name(e) for e in expected)
    if not names:
        return ""
    if len(names) > 6:
        names = names[:6] + ["..."]
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " or " + names[-1]


def _describe_token(tok: Token) -> str:
    if tok.type == "$END":
        return "end of file"
    text = str(tok)
    kinds = {"NAME": "name", "INT": "integer", "FLOAT": "number", "STRING": "string"}
    if tok.type in kinds:
        quoted = text if tok.type == "STRING" else f"'{text}'"
        return f"{kinds[tok.type]} {quoted}"
    return f"'{text}'"


def _tok_span(file: str, tok: Token) -> N.Span:
    return N.Span(
        file,
        tok.line or 1,
        tok.column or 1,
        tok.end_line or tok.line or 1,
        tok.end_column or (tok.column or 1) + 1,
        tok.start_pos or 0,
        tok.end_pos or 0,
    )


def _meta_span(file: str, meta) -> N.Span:
    if getattr(meta, "empty", True):
        return N.NO_SPAN
    return N.Span(
        file,
        meta.line,
        meta.column,
        meta.end_line,
        meta.end_column,
        meta.start_pos,
        meta.end_pos,
    )


def _eof_span(file: str, text: str) -> N.Span:
    lines = text.split("\n")
    line = len(lines)
    # Point at the last non-empty line's end so the caret has a line to stand under.
    while line > 1 and not lines[line - 1].strip():
        line -= 1
    col = len(lines[line - 1]) + 1
    return N.Span(file, line, col, line, col + 1, len(text), len(text))


def _before(text: str, pos: int) -> str:
    """The source before `pos` with comments blanked out (offsets unchanged), for hints."""
    return re.sub(r"#[^\n]*", lambda m: " " * len(m.group()), text[:pos])


def _unclosed_brace(text: str) -> int | None:
    """Offset of the last '{' that is never closed, ignoring comments and strings."""
    stack: list[int] = []
    for m in re.finditer(r'#[^\n]*|"[^"\n]*"?|[{}]', text):
        tok = m.group()
        if tok == "{":
            stack.append(m.start())
        elif tok == "}" and stack:
            stack.pop()
    return stack[-1] if stack else None


def _line_col(text: str, pos: int) -> tuple[int, int]:
    line = text.count("\n", 0, pos) + 1
    return line, pos - (text.rfind("\n", 0, pos) + 1) + 1


def _syntax_error(e: UnexpectedInput, file: str, text: str) -> AttncError:
    if isinstance(e, UnexpectedToken):
        tok = e.token
        notes: tuple[str, ...] = ()
        if tok.type == "$END":
            span = _eof_span(file, text)
            msg = "unexpected end of file"
            brace = _unclosed_brace(text)
            if brace is not None:
                line, col = _line_col(text, brace)
                notes = (f"the '{{' at {file}:{line}:{col} is never closed",)
        else:
            span = _tok_span(file, tok)
            msg = f"unexpected {_describe_token(tok)}"
        word = str(tok) if tok.type == "NAME" else ""
        prev = re.search(r"\b(and|or|not)\s*$", _before(text, tok.start_pos or 0)) if (
            tok.type != "$END") else None
        if word in ("and", "or", "not") or prev:
            w = word if word in ("and", "or", "not") else prev.group(1)
            if prev and word not in ("and", "or", "not"):
                start = prev.start(1)
                line, col = _line_col(text, start)
                span = N.Span(file, line, col, line, col + len(w), start, start + len(w))
            use = {"and": "'&' to combine conditions", "or": "'|' to combine conditions",
                   "not": "'!' to negate a condition"}[w]
            return AttncError(Diagnostic(f"unexpected '{w}'; use {use}", span, text))
        doubled = _before(text, tok.start_pos or 0).rstrip().endswith(str(tok))
        if str(tok) in ("&", "|") and doubled:
            return AttncError(Diagnostic(f"unexpected '{tok}{tok}'; use a single '{tok}'", span,
                                         text))
        if tok.type == "EQUAL":
            nxt = text[tok.end_pos: tok.end_pos + 1] if tok.end_pos is not None else ""
            if nxt == ">":
                return AttncError(Diagnostic(
                    "'=>' is not an operator; write `!a | b` for an implication", span, text))
            return AttncError(Diagnostic("unexpected '='; use '==' to compare", span, text))
        if tok.type == "ADD_OP" and str(tok) == "-" and re.search(
            r"\b(layers|heads|kv_heads)\s+[\d\s,.]*\d\s*$", _before(text, tok.start_pos or 0)
        ):
            return AttncError(Diagnostic(
                "unexpected '-'; write index ranges as 0..3 (both ends included)", span, text))
        try:
            # LALR's state lookahead over-approximates; simulate to list what really fits here.
            expected = set(e.interactive_parser.accepts())
        except Exception:  # noqa: BLE001 - fall back to the parser's own list
            expected = set(e.expected)
        exp = _describe_expected(expected)
        if exp:
            msg += f"; expected {exp}"
        return AttncError(Diagnostic(msg, span, text, notes))
    if isinstance(e, UnexpectedCharacters):
        ch = text[e.pos_in_stream] if e.pos_in_stream < len(text) else ""
        span = N.Span(file, e.line, e.column, e.line, e.column + 1, e.pos_in_stream,
                      e.pos_in_stream + 1)
        if ch == '"':
            end = text.find("\n", e.pos_in_stream)
            end = len(text) if end < 0 else end
            span = N.Span(file, e.line, e.column, e.line, e.column + max(1, end - e.pos_in_stream),
                          e.pos_in_stream, end)
            msg = "unterminated string (strings end on the same line with '\"')"
        elif ch == "=" and text[e.pos_in_stream: e.pos_in_stream + 2] == "=>":
            msg = "'=>' is not an operator; write `!a | b` for an implication"
        elif ch == "=":
            msg = "unexpected '='; use '==' to compare"
        elif ch in "&|" and text[e.pos_in_stream: e.pos_in_stream + 2] in ("&&", "||"):
            msg = f"unexpected '{ch}{ch}'; use a single '{ch}'"
        else:
            msg = f"unexpected character {ch!r}"
        return AttncError(Diagnostic(msg, span, text))
    if isinstance(e, UnexpectedEOF):
        exp = _describe_expected(set(e.expected))
        msg = "unexpected end of file" + (f"; expected {exp}" if exp else "")
        return AttncError(Diagnostic(msg, _eof_span(file, text), text))
    return AttncError(Diagnostic(f"syntax error: {e}", None, text))


_STATEMENTS = {"let", "require", "mask", "bias", "param", "plan_arg", "entry", "default",
               "import_"}


def _tree_depth_ok(tree: Tree) -> Tree | None:
    """The statement holding an expression nested deeper than MAX_DEPTH, or None (iterative:
    this runs before any recursive pass)."""
    stack: list[tuple[Tree, int, Tree]] = [(tree, 0, tree)]
    while stack:
        node, depth, top = stack.pop()
        if node.data in _STATEMENTS:
            top = node
        if depth > MAX_DEPTH:
            return top
        for child in node.children:
            if isinstance(child, Tree):
                stack.append((child, depth + 1, top))
    return None


def _unquote(tok: Token) -> str:
    return str(tok)[1:-1]


INT_MAX = 2**63 - 1


class _LiteralError(Exception):
    def __init__(self, message: str, tok: Token):
        super().__init__(message)
        self.tok = tok


def _int(tok: Token) -> int:
    digits = str(tok).replace("_", "")
    if len(digits) > 19 or int(digits) > INT_MAX:
        raise _LiteralError("integer literal too large (ints are 64-bit: at most "
                            "9223372036854775807)", tok)
    return int(digits)


def _float(tok: Token) -> float:
    v = float(str(tok).replace("_", ""))
    if v == float("inf"):
        raise _LiteralError("number too large for a 64-bit float", tok)
    return v


# Words with a meaning in the grammar; the contextual lexer would let them through as names.
# `layers`, `heads` and `kv_heads` are keywords only inside a plan (alibi has a `heads`).
RESERVED = KEYWORDS


def _name(tok: Token) -> str:
    if str(tok) in RESERVED:
        raise _LiteralError(f"'{tok}' is a reserved word; choose another name", tok)
    return str(tok)


class _ToAst(Transformer):
    def __init__(self, file: str):
        super().__init__()
        self.file = file

    def _s(self, meta) -> N.Span:
        return _meta_span(self.file, meta)

    def _t(self, tok: Token) -> N.Span:
        return _tok_span(self.file, tok)

    # -- files
    @v_args(meta=True)
    def module(self, meta, items):
        return tuple(items)

    @v_args(meta=True)
    def import_(self, meta, c):
        return N.Import(_unquote(c[0]), self._s(meta))

    # -- patterns
    @v_args(meta=True)
    def pattern(self, meta, c):
        name, params, body = c[0], c[1] or (), c[2:]
        return N.PatternDef(_name(name), params, tuple(body), self._s(meta), self._t(name))

    @v_args(meta=True)
    def params(self, meta, c):
        return tuple(p for p in c if p is not None)

    @v_args(meta=True)
    def param(self, meta, c):
        name, typ, rng, default = c
        return N.Param(_name(name), str(typ), rng, default, self._s(meta), self._t(typ))

    @v_args(meta=True)
    def prange(self, meta, c):
        return N.Range(c[0], c[1], self._s(meta))

    @v_args(meta=True)
    def let(self, meta, c):
        return N.Let(_name(c[0]), c[1], self._s(meta), self._t(c[0]))

    @v_args(meta=True)
    def require(self, meta, c):
        msg = _unquote(c[1]) if c[1] is not None else None
        return N.Require(c[0], msg, self._s(meta))

    @v_args(meta=True)
    def mask(self, meta, c):
        return N.Mask(c[0], self._s(meta))

    @v_args(meta=True)
    def bias(self, meta, c):
        return N.Bias(c[0], self._s(meta))

    # -- plans
    @v_args(meta=True)
    def plan(self, meta, c):
        name = c[0]
        args = tuple(a for a in c[1:] if isinstance(a, N.PlanArg))
        entries = tuple(e for e in c[1:] if isinstance(e, (N.PlanEntry, N.PlanDefault)))
        return N.PlanDef(_name(name), args, entries, self._s(meta), self._t(name))

    @v_args(meta=True)
    def plan_arg(self, meta, c):
        return N.PlanArg(str(c[0]), _int(c[1]), self._s(meta))

    @v_args(meta=True)
    def entry(self, meta, c):
        layers, heads, ref = c
        kv = False
        if heads is not None:
            kv, heads = heads
        if layers is not None:
            layers = layers[1]
        return N.PlanEntry(layers, heads, kv, ref, self._s(meta))

    @v_args(meta=True)
    def default(self, meta, c):
        return N.PlanDefault(c[0], self._s(meta))

    @v_args(meta=True)
    def layer_sel(self, meta, c):
        return (False, tuple(c))

    @v_args(meta=True)
    def head_sel(self, meta, c):
        return (False, tuple(c))

    @v_args(meta=True)
    def kv_head_sel(self, meta, c):
        return (True, tuple(c))

    @v_args(meta=True)
    def sel_one(self, meta, c):
        v = _int(c[0])
        return N.SelRange(v, v, False, self._s(meta))

    @v_args(meta=True)
    def sel_range(self, meta, c):
        return N.SelRange(_int(c[0]), _int(c[1]), True, self._s(meta))

    @v_args(meta=True)
    def ref_bare(self, meta, c):
        return N.Call(str(c[0]), (), (), self._s(meta), self._t(c[0]))

    @v_args(meta=True)
    def ref_call(self, meta, c):
        return self.call(meta, c)

    # -- expressions
    @v_args(meta=True)
    def or_(self, meta, c):
        return N.Binary("|", c[0], c[1], self._s(meta))

    @v_args(meta=True)
    def and_(self, meta, c):
        return N.Binary("&", c[0], c[1], self._s(meta))

    @v_args(meta=True)
    def not_(self, meta, c):
        return N.Unary("!", c[0], self._s(meta))

    @v_args(meta=True)
    def compare(self, meta, c):
        return N.Compare(tuple(c[0::2]), tuple(str(t) for t in c[1::2]), self._s(meta))

    @v_args(meta=True)
    def in_(self, meta, c):
        return N.In(c[0], c[1], self._s(meta))

    @v_args(meta=True)
    def binary(self, meta, c):
        return N.Binary(str(c[1]), c[0], c[2], self._s(meta))

    @v_args(meta=True)
    def unary(self, meta, c):
        return N.Unary(str(c[0]), c[1], self._s(meta))

    @v_args(meta=True)
    def pow_(self, meta, c):
        return N.Binary("**", c[0], c[2], self._s(meta))

    @v_args(meta=True)
    def call(self, meta, c):
        name, args = c[0], [a for a in c[1:] if a is not None]
        pos = tuple(a for a in args if not isinstance(a, N.Keyword))
        kws = tuple(a for a in args if isinstance(a, N.Keyword))
        # Positional after keyword is a check error, not a parse error; keep the order visible.
        order_ok = all(not isinstance(a, N.Keyword) for a in args[: len(pos)])
        node = N.Call(_name(name), pos, kws, self._s(meta), self._t(name))
        if not order_ok:
            bad = next(a for a in args[len(pos):] if not isinstance(a, N.Keyword))
            raise AttncError(Diagnostic("positional argument follows keyword argument",
                                        getattr(bad, "span", None)))
        return node

    @v_args(meta=True)
    def attr(self, meta, c):
        return N.Attr(c[0], str(c[1]), self._s(meta), self._t(c[1]))

    @v_args(meta=True)
    def pos_arg(self, meta, c):
        return c[0]

    @v_args(meta=True)
    def kw_arg(self, meta, c):
        return N.Keyword(_name(c[0]), c[1], self._s(meta))

    def int_(self, c):
        return N.IntLit(_int(c[0]), self._t(c[0]))

    def float_(self, c):
        return N.FloatLit(_float(c[0]), self._t(c[0]))

    @v_args(meta=True)
    def true_(self, meta, c):
        return N.BoolLit(True, self._s(meta))

    @v_args(meta=True)
    def false_(self, meta, c):
        return N.BoolLit(False, self._s(meta))

    def name(self, c):
        return N.Name(_name(c[0]), self._t(c[0]))


def parse(text: str, file: str = "<string>") -> N.Module:
    """Parse one .attn file; raises AttncError with a located diagnostic on bad input."""
    register_source(file, text)
    _local.comments = []
    try:
        tree = _parser().parse(text)
    except UnexpectedInput as e:
        raise _syntax_error(e, file, text) from None
    comments = tuple(N.Comment(str(t), _tok_span(file, t)) for t in _local.comments)
    deep = _tree_depth_ok(tree)
    if deep is not None:
        span = _meta_span(file, deep.meta)
        raise AttncError(
            Diagnostic(f"expression too deep (more than {MAX_DEPTH} nested operations); split it "
                       "with let", span, text)
        )
    try:
        items = _ToAst(file).transform(tree)
    except VisitError as e:
        if isinstance(e.orig_exc, AttncError):
            d = e.orig_exc.diagnostics[0]
            raise AttncError(Diagnostic(d.message, d.span, text)) from None
        if isinstance(e.orig_exc, _LiteralError):
            tok = e.orig_exc.tok
            raise AttncError(Diagnostic(str(e.orig_exc), _tok_span(file, tok), text)) from None
        raise
    return N.Module(tuple(items), comments, file, text)


_EXPR_TEXT: contextvars.ContextVar[str | None] = contextvars.ContextVar("expr", default=None)


def _shift_spans(obj, file: str):
    """Move spans from line 2 of the wrapper text to line 1 of the expression's own text."""
    import dataclasses

    if isinstance(obj, N.Span):
        return dataclasses.replace(obj, line=max(1, obj.line - 1),
                                   end_line=max(1, obj.end_line - 1), text=_EXPR_TEXT.get())
    if isinstance(obj, tuple):
        return tuple(_shift_spans(x, file) for x in obj)
    if dataclasses.is_dataclass(obj):
        changes = {f.name: _shift_spans(getattr(obj, f.name), file)
                   for f in dataclasses.fields(obj)}
        return dataclasses.replace(obj, **changes)
    return obj


def parse_expr(text: str, file: str = "<expr>") -> N.Expr:
    """Parse a lone expression (the CLI's --arg values, tests); spans refer to `text` itself."""
    if "\n" in text:
        raise AttncError(Diagnostic("an expression must fit on one line", None))
    token = _EXPR_TEXT.set(text)
    try:
        return _parse_expr(text, file)
    finally:
        _EXPR_TEXT.reset(token)


def _parse_expr(text: str, file: str) -> N.Expr:
    try:
        mod = parse(f"pattern __expr__ {{ let value =\n{text}\n}}", file)
    except AttncError as e:
        d = e.diagnostics[0]
        span = d.span
        if span is not None and span.line >= 2:
            if span.line == 2:
                span = _shift_spans(span, file)
            else:
                end = len(text) + 1
                span = N.Span(file, 1, end, 1, end + 1, len(text), len(text))
        msg = d.message
        for kw in ("'bias', ", "'let', ", "'mask', ", "'require' or ", "'require', "):
            msg = msg.replace(kw, "")
        msg = msg.replace("'}'", "end of expression")
        msg = re.sub(r", (end of expression)$", r" or \1", msg)
        raise AttncError(Diagnostic(msg, span, text)) from None
    return _shift_spans(mod.items[0].body[0].value, file)
