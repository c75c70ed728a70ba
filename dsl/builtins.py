"""The builtin variables and functions of the .attn language, with their signatures."""

from __future__ import annotations

from dataclasses import dataclass

# Types of the language. SET is the type of a run-time selected set of integers.
INT, FLOAT, BOOL, SET = "int", "float", "bool", "set"
NUMERIC = (INT, FLOAT)
PARAM_TYPES = (INT, FLOAT, BOOL)

# Builtin variables: query position, key position, query head, key length (all int).
VARIABLES = {"q": INT, "k": INT, "h": INT, "n": INT}

# Reserved everywhere; `layers`, `heads` and `kv_heads` are keywords only inside plans.
KEYWORDS = {
    "pattern", "plan", "import", "let", "require", "mask", "bias", "in", "true", "false",
    "default",
}


@dataclass(frozen=True)
class BParam:
    name: str
    type: str
    default: object = None  # None: required
    lo: float | None = None
    hi: float | None = None


@dataclass(frozen=True)
class Builtin:
    name: str
    params: tuple[BParam, ...]
    result: str  # a type, or 'promote' (the wider numeric type of the arguments)
    variadic: bool = False  # min / max take two or more arguments
    dynamic: bool = False  # depends on run-time data (scores, learned gate, segment ids)
    uniform_args: bool = False  # arguments may depend on h and n only, never on q or k
    doc: str = ""


def _num(name: str) -> BParam:
    return BParam(name, "num")


BUILTINS: dict[str, Builtin] = {
    b.name: b
    for b in [
        Builtin("min", (_num("a"), _num("b")), "promote", variadic=True,
                doc="smallest argument"),
        Builtin("max", (_num("a"), _num("b")), "promote", variadic=True,
                doc="largest argument"),
        Builtin("abs", (_num("x"),), "promote", doc="absolute value"),
        Builtin("log2", (BParam("x", INT),), INT,
                doc="floor(log2(x)) for x >= 1; 0 for x <= 1"),
        Builtin("floor", (BParam("x", FLOAT),), INT, doc="largest integer <= x"),
        Builtin("ceil", (BParam("x", FLOAT),), INT, doc="smallest integer >= x"),
        Builtin("float", (BParam("x", FLOAT),), FLOAT, doc="x as a float"),
        Builtin("exp", (BParam("x", FLOAT),), FLOAT, doc="e ** x"),
        Builtin("log", (BParam("x", FLOAT),), FLOAT, doc="natural logarithm"),
        Builtin("sqrt", (BParam("x", FLOAT),), FLOAT, doc="square root"),
        Builtin("where", (BParam("cond", BOOL), BParam("a", "any"), BParam("b", "any")),
                "promote", doc="a where cond holds, else b"),
        Builtin(
            "top_columns",
            (BParam("count", INT, None, 0), BParam("last_q", INT, 64, 1),
             BParam("keep_first", INT, 30, 0)),
            SET, dynamic=True, uniform_args=True,
            doc="per head, the `count` key columns with the most attention from the last "
            "`last_q` queries (MInference's vertical lines); the first `keep_first` "
            "columns always rank first",
        ),
        Builtin(
            "top_diagonals",
            (BParam("count", INT, None, 0), BParam("last_q", INT, 64, 1),
             BParam("keep_near", INT, 100, 0)),
            SET, dynamic=True, uniform_args=True,
            doc="per head, the `count` diagonals (offsets q - k >= 0) with the most attention "
            "from the last `last_q` queries (MInference's slash lines); the nearest "
            "`keep_near` diagonals always rank first",
        ),
        Builtin(
            "top_blocks",
            (BParam("count", INT, None, 0), BParam("block", INT, 64, 1),
             BParam("causal", BOOL, True)),
            BOOL, dynamic=True, uniform_args=True,
            doc="per head and query block, the `count` key blocks with the largest mean score "
            "(mean-pooled Q times mean-pooled K; MInference's block-sparse)",
        ),
        Builtin(
            "gate",
            (BParam("block", INT, 64, 1), BParam("topk", INT, 0, 0),
             BParam("threshold", FLOAT, 0.0), BParam("causal", BOOL, True)),
            BOOL, dynamic=True, uniform_args=True,
            doc="a learned block gate (SeerAttention): per head and query block, the key "
            "blocks whose gate score is >= threshold and, when topk > 0, among the topk "
            "best; block >= n makes it DuoAttention's per-head gate",
        ),
        Builtin("segment", (BParam("x", INT),), INT, dynamic=True,
                doc="the segment (document) id of position x, given at run time"),
    ]
}


def promote(a: str, b: str) -> str:
    return FLOAT if FLOAT in (a, b) else a
