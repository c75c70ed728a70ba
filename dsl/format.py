"""The canonical formatter: AST (plus comments and blank lines) back to .attn text.

Formatting is idempotent and `parse(format_module(m)) == m`. Parentheses are printed only where
precedence needs them; comments stay with the item or statement they precede or follow.
"""

from __future__ import annotations

from . import nodes as N

LINE_LENGTH = 99
INDENT = "    "

# Precedence levels, loosest first; each grammar level of dsl/attn.lark has one.
OR, AND, NOT, CMP, SUM, TERM, UNARY, POW, POSTFIX, ATOM = range(1, 11)
_BINARY_LEVEL = {"|": OR, "&": AND, "+": SUM, "-": SUM, "*": TERM, "/": TERM, "//": TERM,
                 "%": TERM}


def _level(e: N.Expr) -> int:
    if isinstance(e, N.Binary):
        return POW if e.op == "**" else _BINARY_LEVEL[e.op]
    if isinstance(e, N.Unary):
        return NOT if e.op == "!" else UNARY
    if isinstance(e, (N.Compare, N.In)):
        return CMP
    if isinstance(e, N.Attr):
        return POSTFIX
    return ATOM


def format_float(v: float) -> str:
    text = repr(float(v))
    if "e" in text or "E" in text:
        mant, _, exp = text.partition("e")
        return f"{mant}e{exp}"
    return text


def format_expr(e: N.Expr, need: int = OR) -> str:
    """Print e, parenthesised when its level is looser than `need`."""
    s = _fmt(e)
    return f"({s})" if _level(e) < need else s


def _fmt(e: N.Expr) -> str:
    if isinstance(e, N.IntLit):
        return str(e.value)
    if isinstance(e, N.FloatLit):
        return format_float(e.value)
    if isinstance(e, N.BoolLit):
        return "true" if e.value else "false"
    if isinstance(e, N.Name):
        return e.id
    if isinstance(e, N.Unary):
        if e.op == "!":
            return "!" + format_expr(e.operand, NOT)
        return e.op + format_expr(e.operand, UNARY)
    if isinstance(e, N.Binary):
        if e.op == "**":
            return f"{format_expr(e.left, POSTFIX)} ** {format_expr(e.right, UNARY)}"
        lv = _BINARY_LEVEL[e.op]
        # Left-associative: the left operand may sit at the same level, the right one may not.
        return f"{format_expr(e.left, lv)} {e.op} {format_expr(e.right, lv + 1)}"
    if isinstance(e, N.Compare):
        parts = [format_expr(e.operands[0], SUM)]
        for op, o in zip(e.ops, e.operands[1:], strict=True):
            parts += [op, format_expr(o, SUM)]
        return " ".join(parts)
    if isinstance(e, N.In):
        return f"{format_expr(e.element, SUM)} in {format_expr(e.container, SUM)}"
    if isinstance(e, N.Call):
        return f"{e.func}({_args(e)})"
    if isinstance(e, N.Attr):
        return f"{format_expr(e.value, POSTFIX)}.{e.attr}"
    raise TypeError(f"cannot format {type(e).__name__}")


def _args(c: N.Call) -> str:
    parts = [format_expr(a) for a in c.args]
    parts += [f"{kw.name} = {format_expr(kw.value)}" for kw in c.kwargs]
    return ", ".join(parts)


def _broken(prefix: str, e: N.Expr, indent: str) -> list[str]:
    """`prefix + e` on one line, or broken before the operators of its chains: the top-level
    chain first, then (inside their parentheses, one level deeper) nested chains that are still
    too long. The result depends on the AST only, so formatting stays idempotent."""
    return _wrap(e, OR, indent + prefix, indent + INDENT)


def _chain(e: N.Binary) -> list[N.Expr]:
    out: list[N.Expr] = []
    node: N.Expr = e
    while isinstance(node, N.Binary) and node.op == e.op:
        out.append(node.right)
        node = node.left
    out.append(node)
    out.reverse()
    return out


def _wrap(e: N.Expr, need: int, first: str, cont: str) -> list[str]:
    """Lines for e (parenthesised if its level is below `need`): the first starts with `first`,
    the others with `cont` (deeper for operands of a parenthesised chain)."""
    one = first + format_expr(e, need)
    if len(one) <= LINE_LENGTH or not isinstance(e, N.Binary) or e.op == "**":
        return [one]
    lv = _BINARY_LEVEL[e.op]
    parens = _level(e) < need
    if parens:
        first, inner = first + "(", cont + INDENT
    else:
        inner = cont
    chain = _chain(e)
    lines = _wrap(chain[0], lv, first, inner)
    for x in chain[1:]:
        lines += _wrap(x, lv + 1, f"{cont if not parens else inner}{e.op} ", inner + INDENT)
    if parens:
        lines[-1] += ")"
    return lines


def _param(p: N.Param) -> str:
    s = f"{p.name}: {p.type}"
    if p.range is not None:
        lo = "" if p.range.lo is None else format_expr(p.range.lo)
        hi = "" if p.range.hi is None else format_expr(p.range.hi)
        s += f" in {lo}..{hi}"
    if p.default is not None:
        s += f" = {format_expr(p.default)}"
    return s


def _string(s: str) -> str:
    return '"' + s + '"'


def _stmt(st: N.Stmt, indent: str) -> list[str]:
    if isinstance(st, N.Let):
        return _broken(f"let {st.name} = ", st.value, indent)
    if isinstance(st, N.Require):
        lines = _broken("require ", st.cond, indent)
        if st.message is not None:
            lines[-1] += ", " + _string(st.message)
        return lines
    if isinstance(st, N.Mask):
        return _broken("mask ", st.expr, indent)
    if isinstance(st, N.Bias):
        return _broken("bias ", st.expr, indent)
    raise TypeError(type(st).__name__)


def _pattern_header(p: N.PatternDef) -> list[str]:
    if not p.params:
        return [f"pattern {p.name} {{"]
    one = f"pattern {p.name}({', '.join(_param(x) for x in p.params)}) {{"
    if len(one) <= LINE_LENGTH:
        return [one]
    return [f"pattern {p.name}("] + [INDENT + _param(x) + "," for x in p.params] + [") {"]


def _sel(sel: tuple[N.SelRange, ...]) -> str:
    return ", ".join(f"{r.lo}..{r.hi}" if r.ranged else str(r.lo) for r in sel)


def _ref(c: N.Call) -> str:
    return c.func if not c.args and not c.kwargs else f"{c.func}({_args(c)})"


def _entry(e: N.PlanEntry | N.PlanDefault) -> str:
    if isinstance(e, N.PlanDefault):
        return f"default: {_ref(e.pattern)}"
    parts = []
    if e.layers is not None:
        parts.append(f"layers {_sel(e.layers)}")
    if e.heads is not None:
        parts.append(f"{'kv_heads' if e.kv_heads else 'heads'} {_sel(e.heads)}")
    return f"{' '.join(parts)}: {_ref(e.pattern)}"


class _Writer:
    """Emits lines, placing the source's comments and single blank lines around elements."""

    def __init__(self, module: N.Module):
        self.out: list[str] = []
        self.comments = sorted(module.comments, key=lambda c: c.span.start)
        self.ci = 0
        src = module.source.split("\n") if module.source else []
        self.nonblank = {i for i, line in enumerate(src, 1) if line.strip()}
        self.has_source = bool(module.source)

    def blank_before(self, line: int) -> bool:
        return self.has_source and line > 1 and (line - 1) not in self.nonblank

    def blank(self) -> None:
        if self.out and self.out[-1] != "":
            self.out.append("")

    def flush(self, before_pos: int, indent: str, first_in_block: bool) -> bool:
        """Emit comments that start before `before_pos`; True if any was emitted."""
        any_ = False
        while self.ci < len(self.comments) and self.comments[self.ci].span.start < before_pos:
            c = self.comments[self.ci]
            if self.blank_before(c.span.line) and not (first_in_block and not any_):
                self.blank()
            self.out.append(indent + c.text.rstrip())
            self.ci += 1
            any_ = True
        return any_

    def trailing(self, line: int, after_pos: int) -> None:
        """Attach a comment on `line` after position `after_pos` to the last emitted line."""
        if self.ci < len(self.comments):
            c = self.comments[self.ci]
            if c.span.line == line and c.span.start >= after_pos:
                self.out[-1] += "  " + c.text.rstrip()
                self.ci += 1

    def element(self, lines: list[str], span: N.Span, indent: str, first: bool) -> None:
        had = self.flush(span.start, indent, first)
        if self.has_source and span.line > 0 and self.blank_before(span.line) and (
            had or not first
        ):
            self.blank()
        self.out.extend(lines)
        if span.line > 0:
            self.trailing(span.end_line, span.end)

    def block(self, header: list[str], span: N.Span, children, indent: str) -> None:
        """A `{ ... }` item: header, children (lines, span) at one more indent, `}`."""
        self.out.extend(header)
        if span.line > 0 and len(header) == 1:
            first_start = children[0][1].start if children else span.end
            # A comment on a one-line header stays there; in a wrapped header (or anywhere else
            # before the first statement) it becomes the first line of the body, so a second
            # formatting pass puts it in the same place.
            if self.ci < len(self.comments):
                c = self.comments[self.ci]
                if c.span.line == span.line and c.span.start < first_start:
                    self.out[-1] += "  " + c.text.rstrip()
                    self.ci += 1
        inner = indent + INDENT
        for i, (lines, sp) in enumerate(children):
            self.element(lines, sp, inner, first=(i == 0))
        if span.line > 0:
            self.flush(span.end - 1, inner, first_in_block=not children)
        self.out.append(indent + "}")
        if span.line > 0:
            self.trailing(span.end_line, span.end)


def format_module(module: N.Module) -> str:
    """Canonical text of a module, ending in one newline."""
    w = _Writer(module)
    prev: object = None
    for item in module.items:
        span = item.span
        if w.out:
            both_imports = isinstance(prev, N.Import) and isinstance(item, N.Import)
            if not both_imports or w.blank_before(span.line):
                w.blank()
        had = w.flush(span.start, "", first_in_block=True) if span.line > 0 else False
        if had and w.blank_before(span.line):
            w.blank()
        if isinstance(item, N.Import):
            w.out.append(f"import {_string(item.path)}")
            if span.line > 0:
                w.trailing(span.end_line, span.end)
        elif isinstance(item, N.PatternDef):
            children = [(_stmt(st, INDENT), st.span) for st in item.body]
            w.block(_pattern_header(item), span, children, "")
        elif isinstance(item, N.PlanDef):
            args = ", ".join(f"{a.name} = {a.value}" for a in item.args)
            children = [([INDENT + _entry(e)], e.span) for e in item.entries]
            w.block([f"plan {item.name}({args}) {{"], span, children, "")
        prev = item
    if w.ci < len(w.comments):
        if w.out:
            w.blank()
        w.flush(len(module.source) + 1, "", first_in_block=True)
    while w.out and w.out[-1] == "":
        w.out.pop()
    return "\n".join(w.out) + "\n" if w.out else ""
