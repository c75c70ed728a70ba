"""Fuzzing `attnc.loads`: mutated library files, token soups and random text.

Every input must either load or raise AttncError whose diagnostics render as
`<file>:<line>:<col>: message` (quoting the right source line, caret under the column) or
`attnc: message`; any other exception fails. Each input must finish within 2 seconds.
"""

from __future__ import annotations

import random
import re
import signal
import string
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from attnc.dsl.errors import AttncError
from attnc.dsl.format import format_module
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import modules

import attnc

FILE = "fuzz.attn"
LIMIT_S = 5.0  # generous: a busy 2-core CI machine must not turn slowness into a hang
PATTERNS = Path(__file__).resolve().parent.parent / "patterns"
LIBRARY = {p.name: p.read_text() for p in sorted(PATTERNS.glob("*.attn"))}
HEADER = re.compile(r"(?:(?P<file>[^\n]+?):(?P<line>\d+):(?P<col>\d+): |attnc: )\S")
# Line breaks other than "\n" for str.splitlines(); the lexer counts lines by "\n" only.
_OTHER_BREAKS = re.compile("[\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


class Hang(BaseException):
    """Raised in the middle of a run that exceeds the time limit (not an Exception, so no
    `except Exception` inside the compiler can swallow it)."""


@contextmanager
def time_limit(seconds: float):
    def on_alarm(signum, frame):
        raise Hang(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def check_diagnostics(err: AttncError, text: str) -> None:
    rendered = err.render()
    assert rendered.strip(), "empty error message"
    assert err.diagnostics
    lines = text.split("\n")
    for d in err.diagnostics:
        out = d.render()
        assert rendered.count(out) >= 1
        m = HEADER.match(out)
        assert m, f"badly rendered diagnostic: {out!r}"
        if m.group("file") != FILE:
            continue
        line, col = int(m.group("line")), int(m.group("col"))
        assert 1 <= line <= len(lines), f"line {line} out of range: {out!r}"
        assert 1 <= col <= len(lines[line - 1]) + 2, f"column {col} out of range: {out!r}"
        if _OTHER_BREAKS.search(text):
            continue  # see test_error_quotes_the_right_line
        body = [x for x in out.split("\n")[1:] if not x.startswith("    note: ")]
        if body:
            assert body[0] == "    " + lines[line - 1], f"wrong line quoted: {out!r}"
            assert body[1].index("^") == 4 + col - 1, f"caret not under column {col}: {out!r}"


# Crashes already reported (each has a strict xfail test below). The random tests tolerate
# exactly these, so that one known bug does not hide the others; remove an entry with its fix.
KNOWN_CRASHES: list[tuple[type, str]] = [
    # All crashes reported so far are fixed; their reproductions stay as regression tests.
]
known_crashes_seen: list[str] = []


def run(text: str, tmp_dir: Path | None = None):
    """Load text under the time limit; return the program or the (checked) AttncError."""
    start = time.perf_counter()
    try:
        with time_limit(LIMIT_S):
            try:
                result = attnc.loads(text, FILE, base_dir=tmp_dir or Path("/nonexistent"))
            except AttncError as e:
                result = e
            except Exception as e:  # noqa: BLE001 - tolerate only the known crashes
                if not any(isinstance(e, t) and re.search(r, str(e)) for t, r in KNOWN_CRASHES):
                    raise
                known_crashes_seen.append(text)
                return None
            if isinstance(result, AttncError):
                check_diagnostics(result, text)
    except Hang:
        pytest.fail(f"no result within {LIMIT_S} s for input {text[:300]!r}")
    elapsed = time.perf_counter() - start
    assert elapsed < LIMIT_S, f"took {elapsed:.1f} s for input {text[:300]!r}"
    return result


# ================================================================ mutations

_TOKEN = re.compile(
    r'"[^"\n]*"?|#[^\n]*|\s+|[0-9][0-9_]*(?:\.[0-9][0-9_]*)?(?:[eE][+-]?[0-9]+)?'
    r"|[A-Za-z_][A-Za-z_0-9]*|\*\*|//|\.\.|<=|>=|==|!=|=>|&&|\|\||.",
    re.S,
)
KEYWORDS = ["pattern", "plan", "import", "let", "require", "mask", "bias", "in", "true",
            "false", "default", "layers", "heads", "kv_heads", "and", "or", "not"]
OPERATORS = ["+", "-", "*", "/", "//", "%", "**", "&", "|", "!", "<", "<=", ">", ">=", "==",
             "!=", "=", "..", ".", ",", ":", "(", ")", "{", "}", "=>", "&&", "[", "]", ";"]
ATOMS = ["q", "k", "h", "n", "0", "1", "64", "-1", "0.5", "1e9", "9223372036854775807",
         "9223372036854775808", "1e308", '"x.attn"', '""', "causal", "window", "min", "max",
         "where", "top_columns", "segment", "gate", "log2", "abs", "float", "int", "bool",
         "size", ".bias", ".mask", "# c\n", "\n", "\t", "é", "∞", "\x00"]
CHARS = string.printable + "éü∞→\u00a0\u200b\ufeff\x00\x7f" + "(){}[]<>=!&|.,:#\"\\"


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


def mutate_chars(text: str, rng: random.Random) -> str:
    for _ in range(rng.randint(1, 4)):
        if not text:
            text = rng.choice(CHARS)
            continue
        i = rng.randrange(len(text))
        j = min(len(text), i + rng.randint(1, 12))
        op = rng.randrange(6)
        if op == 0:  # delete
            text = text[:i] + text[j:]
        elif op == 1:  # insert
            junk = "".join(rng.choice(CHARS) for _ in range(rng.randint(1, 3)))
            text = text[:i] + junk + text[i:]
        elif op == 2:  # duplicate
            text = text[:j] + text[i:j] + text[j:]
        elif op == 3:  # swap two characters
            k = rng.randrange(len(text))
            a, b = sorted((i, k))
            if a != b:
                text = text[:a] + text[b] + text[a + 1:b] + text[a] + text[b + 1:]
        elif op == 4:  # replace
            text = text[:i] + rng.choice(CHARS) + text[i + 1:]
        else:  # truncate
            text = text[:i]
    return text


def mutate_tokens(text: str, rng: random.Random) -> str:
    toks = tokens(text)
    for _ in range(rng.randint(1, 3)):
        solid = [i for i, t in enumerate(toks) if not t.isspace()]
        if not solid:
            toks.append(rng.choice(KEYWORDS + OPERATORS + ATOMS))
            continue
        i = rng.choice(solid)
        op = rng.randrange(6)
        if op == 0:
            del toks[i]
        elif op == 1:
            toks.insert(i, toks[i] + " ")
        elif op == 2:
            k = rng.choice(solid)
            toks[i], toks[k] = toks[k], toks[i]
        elif op == 3:
            toks.insert(i, " " + rng.choice(KEYWORDS) + " ")
        elif op == 4:
            toks.insert(i, rng.choice(OPERATORS))
        else:
            toks[i] = rng.choice(ATOMS + OPERATORS + KEYWORDS)
    return "".join(toks)


def test_tokenizer_round_trips():
    for text in LIBRARY.values():
        assert "".join(tokens(text)) == text


@pytest.mark.parametrize("name", sorted(LIBRARY))
def test_library_file_loads(name):
    assert isinstance(run(LIBRARY[name]), attnc.Program)


@pytest.mark.parametrize("name", sorted(LIBRARY))
def test_mutated_library_files(name):
    rng = random.Random(f"attnc-fuzz-{name}")
    text = LIBRARY[name]
    for _ in range(40):
        run(mutate_chars(text, rng))
        run(mutate_tokens(text, rng))


def test_mutated_library_concatenation():
    """Mutations that reach across files: all of the library in one text (duplicate names,
    calls between patterns), mutated at the token level."""
    rng = random.Random(1234)
    whole = "\n".join(LIBRARY.values())
    for _ in range(40):
        run(mutate_tokens(whole, rng))
        run(mutate_chars(whole, rng))


@settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(LIBRARY)), st.lists(st.tuples(
    st.integers(0, 5), st.integers(0, 10**6), st.sampled_from(KEYWORDS + OPERATORS + ATOMS),
), min_size=1, max_size=4))
def test_token_mutations_hypothesis(name, edits):
    """Token edits chosen by hypothesis (so failures shrink to a minimal edit list)."""
    toks = tokens(LIBRARY[name])
    for op, pos, word in edits:
        i = pos % max(1, len(toks))
        if op == 0 and toks:
            del toks[i]
        elif op == 1 and toks:
            toks.insert(i, toks[i])
        elif op == 2 and toks:
            k = (pos // 7) % len(toks)
            toks[i], toks[k] = toks[k], toks[i]
        elif op == 3 and toks:
            toks[i] = word
        else:
            toks.insert(i, " " + word + " ")
    run("".join(toks))


# ================================================================ random text


def test_edge_inputs_load():
    for text in ["", " ", "\n\n\n", "\t", "# only a comment", "# one\n# two\n", "#", "#\n#",
                 "# é ∞ \x00 comment", "\n# c\n   # d   \n"]:
        result = run(text)
        assert isinstance(result, attnc.Program), repr(text)
        assert not result.local_patterns and not result.plans


DEEP = 3000
EDGE_INPUTS = {
    "nested-parens": "pattern p { mask " + "(" * DEEP + "k <= q" + ")" * DEEP + " }",
    "unclosed-parens": "pattern p { mask " + "(" * DEEP + "k",
    "unopened-parens": "pattern p { mask k" + ")" * DEEP + " }",
    "nested-calls": "pattern p { mask " + "abs(" * DEEP + "q" + ")" * DEEP + " < k }",
    "nested-not": "pattern p { mask " + "!" * DEEP + "true }",
    "nested-minus": "pattern p { mask " + "-" * DEEP + "q < k }",
    "nested-power": "pattern p { mask 2" + " ** 2" * DEEP + " < k }",
    "nested-attr": "pattern p { mask causal" + ".mask" * DEEP + " }",
    "nested-where": "pattern p { mask " + "where(true, " * DEEP + "true" + ", false)" * DEEP
                    + " }",
    "long-sum": "pattern p { mask q" + " + 1" * 5000 + " < k }",
    "long-and": "pattern p { mask q < k" + " & k < q" * 5000 + " }",
    "long-compare-chain": "pattern p { mask q" + " <= q" * 5000 + " }",
    "long-call": "pattern p { mask max(q" + ", k" * 5000 + ") < k }",
    "many-lets": "pattern p {\n" + "".join(f"    let x{i} = x{i - 1} + 1\n" if i else
                                           "    let x0 = q\n" for i in range(3000))
                 + "    mask x2999 < k\n}\n",
    "many-patterns": "".join(f"pattern p{i} {{ mask p{i - 1} | k == {i} }}\n" if i else
                             "pattern p0 { mask k <= q }\n" for i in range(500)),
    "many-params": "pattern p(" + ", ".join(f"a{i}: int in 0.. = {i}" for i in range(2000))
                   + ") { mask true }",
    "huge-int": "pattern p { mask q < " + "9" * 5000 + " }",
    "huge-float": "pattern p { mask 1" + "0" * 400 + ".0 < 1e999 }",
    "tiny-float": "pattern p { bias 1e-999 + 0." + "0" * 400 + "1 }",
    "long-name": "pattern " + "a" * 100000 + " { mask true }",
    "long-string": 'require "' + "x" * 100000 + '"',
    "long-comment": "#" + "x" * 100000,
    "unterminated-string": 'pattern p { require n > 0, "oops\n mask true }',
    "big-plan": "plan p(layers = 1000000, heads = 1000000) { default: dense }",
    "many-plan-entries": "plan p(layers = 100, heads = 8) {\n" + "".join(
        f"    layers {i} heads 0..7: window(size = {i + 1})\n" for i in range(100)) + "}\n",
    "bom": "\ufeffpattern p { mask true }",
    "nul": "pattern p { mask true }\x00",
    "crlf": "pattern p {\r\n    mask k <= q\r\n}\r\n",
    "cr-only": "pattern p {\r    mask k <= q\r}\r",
    "tabs": "pattern\tp\t{\tmask\tk\t<=\tq\t}",
    "rtl": "pattern p { mask k <= q } # \u202e\u2067 rtl",
    "surrogate": "pattern p { mask q\ud800 }",
    "keywords": " ".join(KEYWORDS * 20),
    "operators": " ".join(OPERATORS * 20),
    "import-self": 'import "fuzz.attn"\npattern p { mask true }',
    "import-dir": 'import "."\nimport "/"\nimport ".attn"\nimport "/dev/null.attn"',
    # Zero divisors that are not literal zeros (those are check errors of their own).
    "nonfinite-constants": "pattern p(a: float in (0.0 / (1.0 - 1.0))..(1.0 / (1.0 - 1.0)) = "
                           "exp(1e308), b: int in floor(1e308 * 10.0).. = 2 ** 64, "
                           "c: float = (-2.0) ** 0.5) { mask window(size = 2 ** 70) & "
                           "window(size = floor(0.0 / (1.0 - 1.0))) }",
}


@pytest.mark.parametrize("name", sorted(EDGE_INPUTS))
def test_edge_inputs(name, tmp_path):
    run(EDGE_INPUTS[name], tmp_path)


def test_random_printable_text():
    rng = random.Random(99)
    for _ in range(300):
        n = rng.choice([1, 5, 20, 100, 400])
        run("".join(rng.choice(CHARS) for _ in range(n)))


def test_random_token_soup():
    rng = random.Random(7)
    pool = KEYWORDS + OPERATORS + ATOMS
    for _ in range(300):
        n = rng.choice([2, 5, 10, 40, 200])
        run(" ".join(rng.choice(pool) for _ in range(n)))


def test_random_statement_soup():
    """Syntactically plausible bodies glued from library statements and random expressions."""
    rng = random.Random(3)
    stmts = [line.strip() for text in LIBRARY.values() for line in text.splitlines()
             if line.strip().startswith(("mask", "bias", "let", "require"))]
    heads = [line.rstrip(" {") for text in LIBRARY.values() for line in text.splitlines()
             if line.startswith("pattern")]
    for _ in range(150):
        body = "\n".join(rng.choice(stmts) for _ in range(rng.randint(0, 4)))
        head = rng.choice(heads + ["pattern p", "pattern q", "pattern p(size: int = 3)"])
        run(f"{head} {{\n{body}\n}}\n")


@settings(deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_arbitrary_text(text):
    run(text)


@settings(deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=st.sampled_from(list("pattern{}()mask bias let q k h n 0 1 < = & | ! "
                                             ",.:+-*/%#\"\n")), max_size=120))
def test_near_language_text(text):
    run(text)


@settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(modules(max_items=3))
def test_checker_on_syntactically_valid_modules(m):
    """Arbitrary well-formed ASTs (mostly ill-typed) through the whole checker."""
    run(format_module(m))


# ================================================================ known bugs (minimal repros)


def _instantiate_chain(depth: int) -> str:
    lines = ["pattern p0 { mask k <= q }"]
    lines += [f"pattern p{i} {{ mask p{i - 1}() & p{i - 1}() }}" for i in range(1, depth + 1)]
    return "\n".join(lines) + "\n"


def test_known_bug_call_chain_is_exponential():
    run(_instantiate_chain(24))


def test_known_bug_plan_selection_is_quadratic():
    run("plan p(layers = 1000000, heads = 1) { layers 0..999999: dense }")


def test_known_bug_constant_power_is_slow():
    bound = "(((10 ** 62) ** 62) ** 62) ** 8"
    params = ", ".join(f"a{i}: int in 0..{bound}" for i in range(12))
    run(f"pattern p({params}) {{ mask true }}")


@pytest.mark.parametrize("text", [
    "pattern p(x: bool = causal) { mask x }",
    "pattern p(x: float = alibi().bias) { mask true }",
])
def test_known_bug_pattern_in_parameter_default(text):
    with pytest.raises(AttncError, match="default of 'x' may depend on n and h"):
        attnc.loads(text, FILE)


@pytest.mark.parametrize("text", [
    "pattern p { mask window(log2(1.5)) }",
    "pattern p(x: int = log2(1.5)) { mask true }",
    "pattern p(x: int in 0..floor()) { mask true }",
])
def test_known_bug_constant_folding_of_ill_typed_call(text):
    with pytest.raises(AttncError):
        attnc.loads(text, FILE)


@pytest.mark.parametrize("path", ["\x00", "a\x00.attn", "a" * 300 + ".attn"],
                         ids=["nul", "nul-attn", "long-name"])
def test_known_bug_bad_import_path(path, tmp_path):
    with pytest.raises(AttncError, match="cannot import"):
        attnc.loads(f'import "{path}"', FILE, base_dir=tmp_path)


@pytest.mark.parametrize("text", [
    "pattern a {\x0c\nmask ) }",
    "pattern a {\rmask ) }",
    "# \u2028 x\npattern b { mask ) }",
    "# \x85\npattern b { mask ) }",
])
def test_error_quotes_the_right_line(text):
    with pytest.raises(AttncError) as info:
        attnc.loads(text, FILE)
    out = info.value.diagnostics[0].render()
    line = int(HEADER.match(out).group("line"))
    assert out.split("\n")[1] == "    " + text.split("\n")[line - 1], out
