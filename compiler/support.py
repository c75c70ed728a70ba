"""Symbolic key-block ranges: for each query block, where a pattern can keep pairs (visit) and
where it keeps all of them (full), as closed-form expressions of the block's first and last
query (q0, q1) and n.

The mask is put in disjunctive normal form; in each conjunct, atoms linear in k (or in k // B)
become lower and upper bounds on k, atoms free of k become guards on q, and block-uniform
congruences (k // B + c) % m == r become strided ranges. Anything else makes the conjunct
"impure": it is still visited over its bounds, but never called full by the rules (the block
classifier decides those blocks exactly).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .ir import FALSE, TRUE, Const, Node, Op, Sel, Var, free_vars, op, to_text

MAX_CONJUNCTS = 64

Q0, Q1, KMAX = Var("q0"), Var("q1"), Var("kmax")  # kmax: the last key of the grid


# ---------------------------------------------------------------- DNF


def _push_not(e: Node, negate: bool) -> Node:
    if isinstance(e, Op) and e.op == "not":
        return _push_not(e.args[0], not negate)
    if isinstance(e, Op) and e.op in ("and", "or"):
        name = e.op if not negate else ("or" if e.op == "and" else "and")
        return Op(name, tuple(_push_not(a, negate) for a in e.args))
    if not negate:
        return e
    if isinstance(e, Const):
        return Const(not e.value)
    if isinstance(e, Op) and e.op in ("lt", "le", "eq", "ne") and not _is_float_cmp(e):
        a, b = e.args
        return {"lt": op("le", b, a), "le": op("lt", b, a), "eq": op("ne", a, b),
                "ne": op("eq", a, b)}[e.op]
    return op("not", e)


def _is_float_cmp(e: Op) -> bool:
    from .ir import FLOAT, type_of

    return any(type_of(a) == FLOAT for a in e.args)


def dnf(e: Node) -> list[list[Node]] | None:
    """Conjuncts of atoms, or None when the DNF would exceed MAX_CONJUNCTS."""
    e = _push_not(e, False)

    def go(x: Node) -> list[list[Node]] | None:
        if isinstance(x, Op) and x.op == "or":
            out: list[list[Node]] = []
            for a in x.args:
                sub = go(a)
                if sub is None:
                    return None
                out += sub
                if len(out) > MAX_CONJUNCTS:
                    return None
            return out
        if isinstance(x, Op) and x.op == "and":
            acc: list[list[Node]] = [[]]
            for a in x.args:
                sub = go(a)
                if sub is None:
                    return None
                acc = [c + s for c in acc for s in sub]
                if len(acc) > MAX_CONJUNCTS:
                    return None
            return acc
        if x == TRUE:
            return [[]]
        if x == FALSE:
            return []
        return [[x]]

    return go(e)


# ---------------------------------------------------------------- linear forms in k


@dataclass
class Linear:
    """coefs[key] * key + rest, where key is 'k' or ('kdiv', B) = k // B, and rest has no k."""

    coefs: dict
    rest: Node


def _add(a: Node, b: Node) -> Node:
    if a == Const(0):
        return b
    if b == Const(0):
        return a
    return op("add", a, b)


def _scale(a: Node, c: int) -> Node:
    if c == 1:
        return a
    if c == -1:
        return op("neg", a)
    return op("mul", a, Const(c))


def linear(e: Node) -> Linear | None:
    if "k" not in free_vars(e):
        return Linear({}, e)
    if e == Var("k"):
        return Linear({"k": 1}, Const(0))
    if isinstance(e, Op):
        if e.op in ("add", "sub"):
            a, b = linear(e.args[0]), linear(e.args[1])
            if a is None or b is None:
                return None
            sign = 1 if e.op == "add" else -1
            coefs = dict(a.coefs)
            for key, c in b.coefs.items():
                coefs[key] = coefs.get(key, 0) + sign * c
            coefs = {key: c for key, c in coefs.items() if c != 0}
            rest = _add(a.rest, b.rest) if sign == 1 else op("sub", a.rest, b.rest)
            return Linear(coefs, rest)
        if e.op == "neg":
            a = linear(e.args[0])
            if a is None:
                return None
            return Linear({key: -c for key, c in a.coefs.items()}, op("neg", a.rest))
        if e.op == "mul":
            for x, y in (e.args, e.args[::-1]):
                if isinstance(y, Const) and isinstance(y.value, int) and not isinstance(
                        y.value, bool):
                    a = linear(x)
                    if a is None:
                        return None
                    c = y.value
                    return Linear({key: v * c for key, v in a.coefs.items() if v * c},
                                  _scale(a.rest, c) if c else Const(0))
            return None
        if e.op == "fdiv" and e.args[0] == Var("k"):
            b = e.args[1]
            if isinstance(b, Const) and isinstance(b.value, int) and b.value > 0:
                return Linear({("kdiv", b.value): 1}, Const(0))
    return None


# ---------------------------------------------------------------- monotonicity in q

INC, DEC, CONST, UNKNOWN = 1, -1, 0, None


def mono(e: Node) -> int | None:
    """Direction in which e moves when q grows (other variables fixed)."""
    if "q" not in free_vars(e):
        return CONST
    if e == Var("q"):
        return INC
    if not isinstance(e, Op):
        return UNKNOWN
    if e.op in ("add", "sub"):
        a, b = mono(e.args[0]), mono(e.args[1])
        if b is not None and e.op == "sub":
            b = -b
        return _combine(a, b)
    if e.op == "neg":
        m = mono(e.args[0])
        return None if m is None else -m
    if e.op == "mul":
        for x, y in (e.args, e.args[::-1]):
            if isinstance(y, Const) and not isinstance(y.value, bool):
                m = mono(x)
                if m is None:
                    return None
                return m if y.value > 0 else -m if y.value < 0 else CONST
        return UNKNOWN
    if e.op in ("fdiv", "div"):
        d = e.args[1]
        if isinstance(d, Const) and not isinstance(d.value, bool) and d.value != 0:
            m = mono(e.args[0])
            if m is None:
                return None
            return m if d.value > 0 else -m
        return UNKNOWN
    if e.op in ("min", "max"):
        out = CONST
        for a in e.args:
            out = _combine(out, mono(a))
        return out
    if e.op in ("log2", "floor", "ceil", "float", "exp", "log", "sqrt"):
        return mono(e.args[0])
    return UNKNOWN


def _combine(a, b):
    if a is None or b is None:
        return None
    if a == CONST:
        return b
    if b == CONST or a == b:
        return a
    return None


def _at(e: Node, q: Node) -> Node:
    from .ir import substitute

    return substitute(e, {"q": q})


# ---------------------------------------------------------------- conjunct rules


@dataclass
class Stride:
    """Keys k whose pattern block j = k // block has (j - offset) % step == 0."""

    block: int  # B, in keys
    step: int  # modulus m
    offset: Node  # residue of j, an expression of n


@dataclass
class Rule:
    """One conjunct, as closed-form key ranges of a query block [q0, q1] (inclusive, in k)."""

    visit_lo: Node
    visit_hi: Node
    full_lo: Node | None  # None: this conjunct never proves a block full
    full_hi: Node | None
    guards: list[Node] = field(default_factory=list)  # atoms free of k (over q)
    stride: Stride | None = None
    impure: list[Node] = field(default_factory=list)  # atoms the rule does not capture

    def text(self) -> str:
        lines = [f"visit k in [{to_text(self.visit_lo)}, {to_text(self.visit_hi)}]"]
        if self.full_lo is not None:
            lines.append(f"full  k in [{to_text(self.full_lo)}, {to_text(self.full_hi)}]")
        if self.stride is not None:
            s = self.stride
            lines.append(f"only  k with (k // {s.block} - {to_text(s.offset)}) % {s.step} == 0")
        for g in self.guards:
            lines.append(f"when  {to_text(g)} (for q in [q0, q1])")
        for a in self.impure:
            lines.append(f"test  {to_text(a)}")
        return "\n".join(lines)


def _bound(atom: Op):
    """An atom as ('lo' | 'hi', k-bound expression of q) pairs, or None if it is not one."""
    if not isinstance(atom, Op) or atom.op not in ("lt", "le", "eq"):
        return None
    if _is_float_cmp(atom):
        return None
    lf = linear(op("sub", atom.args[0], atom.args[1]))
    if lf is None or len(lf.coefs) != 1:
        return None
    (key, c), = lf.coefs.items()
    r = lf.rest
    # c * x + r  OP  0, with x = k or k // B.
    out = []
    if atom.op in ("lt", "le", "eq"):
        strict = atom.op == "lt"
        if c > 0:
            # x <= floor((-r - 1) / c) (strict) or floor(-r / c)
            num = op("sub", op("neg", r), Const(1)) if strict else op("neg", r)
            out.append(("hi", op("fdiv", num, Const(c)) if c != 1 else num))
        else:
            # x >= floor(r / |c|) + 1 (strict) or ceil(r / |c|) = -floor(-r / |c|)
            a = -c
            if strict:
                out.append(("lo", op("add", op("fdiv", r, Const(a)) if a != 1 else r, Const(1))))
            else:
                out.append(("lo", op("neg", op("fdiv", op("neg", r), Const(a))) if a != 1
                            else r))
        if atom.op == "eq":
            # The other direction of c x + r <= 0 and >= 0.
            if c > 0:
                out.append(("lo", op("neg", op("fdiv", r, Const(c))) if c != 1
                            else op("neg", r)))
            else:
                a = -c
                out.append(("hi", op("fdiv", r, Const(a)) if a != 1 else r))
    if key == "k":
        return out
    B = key[1]
    conv = []
    for side, x in out:
        conv.append((side, op("mul", x, Const(B)) if side == "lo" else
                     op("add", op("mul", x, Const(B)), Const(B - 1))))
    return conv


def _stride(atom: Node, block_n: int) -> Stride | None:
    """(k // B + c) % m == r with B a multiple of BLOCK_N and c free of k."""
    if not (isinstance(atom, Op) and atom.op == "eq"):
        return None
    a, b = atom.args
    if isinstance(a, Const):
        a, b = b, a
    if not (isinstance(a, Op) and a.op == "mod" and "k" not in free_vars(b)):
        return None
    m = a.args[1]
    if not (isinstance(m, Const) and isinstance(m.value, int) and m.value > 0):
        return None
    lf = linear(a.args[0])
    if lf is None or len(lf.coefs) != 1:
        return None
    (key, c), = lf.coefs.items()
    if key == "k" or c not in (1, -1):
        return None
    B = key[1]
    if "q" in free_vars(lf.rest) or "q" in free_vars(b):
        return None
    # c * j + rest = b (mod m)  =>  j = c * (b - rest) (mod m)
    offset = op("mul", op("sub", b, lf.rest), Const(c))
    return Stride(B, m.value, _fold(op("mod", offset, Const(m.value))))


def conjunct_rule(atoms: list[Node], block_n: int) -> Rule | None:
    """The rule of one conjunct, or None when the conjunct is unsatisfiable by construction."""
    lows: list[Node] = [Const(0)]
    highs: list[Node] = [KMAX]
    guards: list[Node] = []
    impure: list[Node] = []
    stride: Stride | None = None
    for a in atoms:
        if a == FALSE:
            return None
        if a == TRUE:
            continue
        if isinstance(a, Sel) or "k" in free_vars(a) and isinstance(a, Op) and a.op == "not":
            impure.append(a)
            continue
        if "k" not in free_vars(a) and not isinstance(a, Sel):
            guards.append(a)
            continue
        b = _bound(a)
        if b is not None:
            for side, x in b:
                (lows if side == "lo" else highs).append(x)
            continue
        s = _stride(a, block_n) if stride is None else None
        if s is not None:
            stride = s
            continue
        impure.append(a)
    # Contradictory bounds (k <= q & k > q): a lower bound above an upper bound by a constant
    # for every q makes the conjunct empty.
    for lo_b in lows:
        for hi_b in highs:
            diff = _fold(op("sub", lo_b, hi_b))
            if isinstance(diff, Const) and not isinstance(diff.value, bool) and diff.value > 0:
                return None
    # Extremes over the query block, by monotonicity of each bound in q.
    vis_lo, vis_hi, full_lo, full_hi = [], [], [], []
    exact = True
    for x in lows:
        m = mono(x)
        if m is None:
            exact = False
            continue
        vis_lo.append(_at(x, Q1 if m == DEC else Q0))
        full_lo.append(_at(x, Q0 if m == DEC else Q1))
    for x in highs:
        m = mono(x)
        if m is None:
            exact = False
            continue
        vis_hi.append(_at(x, Q0 if m == DEC else Q1))
        full_hi.append(_at(x, Q1 if m == DEC else Q0))
    pure = exact and not impure
    return Rule(
        visit_lo=_fold(_max(vis_lo)),
        visit_hi=_fold(_min(vis_hi)),
        full_lo=_fold(_max(full_lo)) if pure else None,
        full_hi=_fold(_min(full_hi)) if pure else None,
        guards=guards,
        stride=stride,
        impure=impure,
    )


def _max(xs: list[Node]) -> Node:
    xs = list(dict.fromkeys(xs))
    return xs[0] if len(xs) == 1 else Op("max", tuple(xs))


def _min(xs: list[Node]) -> Node:
    xs = list(dict.fromkeys(xs))
    return xs[0] if len(xs) == 1 else Op("min", tuple(xs))


def _fold(e: Node) -> Node:
    from .rules import rewrite

    return rewrite(e)


def _unfold_abs(e: Node) -> Node:
    """|x| < c  =  -c < x < c;  c < |x|  =  x < -c | c < x  (and <= alike), c free of k: turns
    distance bands into bounds the rules can use."""
    def go(x: Node) -> Node:
        if isinstance(x, Op):
            x = Op(x.op, tuple(go(a) for a in x.args))
            if x.op in ("lt", "le") and not _is_float_cmp(x):
                a, b = x.args
                if _is_abs(a) and "k" not in free_vars(b):
                    inner = a.args[0]
                    return op("and", op(x.op, op("neg", b), inner), op(x.op, inner, b))
                if _is_abs(b) and "k" not in free_vars(a):
                    inner = b.args[0]
                    return op("or", op(x.op, inner, op("neg", a)), op(x.op, a, inner))
        return x

    return go(e)


def _is_abs(x: Node) -> bool:
    return isinstance(x, Op) and x.op == "abs"


def derive(mask: Node, block_n: int) -> list[Rule] | None:
    """Rules whose union covers the mask (None: no usable DNF; visit everything)."""
    out = derive_with_mask(mask, block_n)
    return None if out is None else out[0]


def derive_with_mask(mask: Node, block_n: int) -> tuple[list[Rule], Node] | None:
    """Rules, and the mask rebuilt from the satisfiable conjuncts only (equal to the mask on
    every pair, but free of contradictions such as k <= q & q - k < 0, which the interval
    classifier cannot refute on its own)."""
    conj = dnf(_unfold_abs(mask))
    if conj is None:
        return None
    rules = []
    kept = []
    for c in conj:
        r = conjunct_rule(c, block_n)
        if r is not None:
            rules.append(r)
            kept.append(c)
    if len(kept) == len(conj):
        return rules, mask
    if not kept:
        return rules, FALSE
    terms = [c[0] if len(c) == 1 else Op("and", tuple(c)) if c else TRUE for c in kept]
    return rules, _fold(terms[0] if len(terms) == 1 else Op("or", tuple(terms)))


def fallback_rule() -> Rule:
    """Visit every key; prove nothing full (used when no DNF is available)."""
    return Rule(Const(0), KMAX, None, None, impure=[TRUE])
