"""Shipped calibration and held-out text (generated chronicle, Python docs) and passkey prompts."""

from __future__ import annotations

import random
from importlib import resources
from pathlib import Path

_FIRST = ["Ada", "Bram", "Celia", "Dorian", "Elif", "Farid", "Greta", "Hugo", "Ines", "Jonas",
          "Kira", "Lukas", "Mira", "Nils", "Olga", "Pavel", "Rosa", "Soren", "Tilda", "Viktor",
          "Wanda", "Yusuf", "Zora", "Emil", "Hana", "Ivo", "Lena", "Marek", "Nora", "Otto"]
_LAST = ["Abbott", "Brandt", "Castell", "Dunmore", "Eklund", "Falk", "Grieve", "Holm",
         "Ivers", "Janssen", "Kovac", "Lindqvist", "Marsh", "Novak", "Orr", "Petrov", "Quist",
         "Rowe", "Strand", "Thorne", "Ulrich", "Vance", "Wilde", "Young", "Zeller"]
_PLACES = ["the north mill", "the river market", "the old observatory", "the salt warehouse",
           "the glass foundry", "the harbour office", "the orchard school", "the stone bridge",
           "the weavers' hall", "the lower archive", "the clock tower", "the ferry landing",
           "the copper mine", "the bell foundry", "the east granary", "the map room"]
_ROLES = ["keeper", "treasurer", "surveyor", "archivist", "ferrywoman", "clockmaker",
          "apothecary", "cartographer", "brewer", "glazier", "harbour master", "bell ringer",
          "schoolteacher", "miller", "engineer", "beekeeper"]
_THINGS = ["lanterns", "ledgers", "copper kettles", "wool bales", "maps", "barrels of cider",
           "bronze bells", "spools of thread", "crates of glass", "sacks of grain", "compasses",
           "wax candles", "iron hinges", "jars of honey", "rolls of canvas", "clay pipes"]
_ADJ = ["quiet", "busy", "cold", "bright", "narrow", "crowded", "damp", "windy", "orderly",
        "ancient", "restless", "careful", "patient", "stubborn", "cheerful", "tired"]
_WEATHER = ["Rain fell on the slate roofs all morning.", "A dry wind came down from the hills.",
            "Fog lay over the water until noon.", "The sun came out late in the afternoon.",
            "Snow had settled on the ridge above the town.", "The evening was mild and clear."]
_VERBS = ["counted", "repaired", "carried", "inspected", "sold", "recorded", "cleaned",
          "painted", "weighed", "sorted", "packed", "returned"]
_NUMWORDS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
             "twelve", "fifteen", "twenty", "thirty", "forty"]


class _Chronicle:
    """A town chronicle: people, places and stores are introduced and later recalled word for
    word, so a reader (a language model) profits from attending far back."""

    def __init__(self, seed: int):
        self.r = random.Random(seed)
        r = self.r
        self.people = [f"{r.choice(_FIRST)} {r.choice(_LAST)}" for _ in range(18)]
        self.facts: list[str] = []
        self.day = 1

    def _intro(self) -> str:
        r = self.r
        who = r.choice(self.people)
        role, place, thing = r.choice(_ROLES), r.choice(_PLACES), r.choice(_THINGS)
        count = r.choice(_NUMWORDS)
        fact = f"{who}, the {role} of {place}, keeps {count} {thing} in a {r.choice(_ADJ)} room"
        self.facts.append(fact)
        return f"It was written that {fact}."

    def _event(self) -> str:
        r = self.r
        who, other = r.sample(self.people, 2)
        return r.choice([
            f"{who} {r.choice(_VERBS)} the {r.choice(_THINGS)} at {r.choice(_PLACES)} "
            f"while {other} watched.",
            f"At {r.choice(_PLACES)}, {who} met {other} and they spoke about the "
            f"{r.choice(_THINGS)}.",
            f"{who} walked from {r.choice(_PLACES)} to {r.choice(_PLACES)} before dark.",
            f"The {r.choice(_ADJ)} crowd at {r.choice(_PLACES)} waited for {who}.",
            f"{other} said that {who} had {r.choice(_VERBS)} {r.choice(_NUMWORDS)} "
            f"{r.choice(_THINGS)} that week.",
        ])

    def _recall(self) -> str:
        r = self.r
        fact = r.choice(self.facts)
        return r.choice([
            f"As the chronicle said before, {fact}.",
            f"Remember that {fact}.",
            f"Nobody had forgotten that {fact}.",
        ])

    def paragraph(self) -> str:
        r = self.r
        out = [f"Day {self.day}.", r.choice(_WEATHER)]
        self.day += 1
        for _ in range(r.randint(3, 6)):
            x = r.random()
            if not self.facts or x < 0.15:
                out.append(self._intro())
            elif x < 0.27:
                out.append(self._recall())
            else:
                out.append(self._event())
        return " ".join(out)


def chronicle(chars: int, seed: int = 0) -> str:
    """About `chars` characters of generated chronicle text (paragraphs separated by newlines)."""
    c = _Chronicle(seed)
    parts: list[str] = []
    total = 0
    while total < chars:
        p = c.paragraph()
        parts.append(p)
        total += len(p) + 1
    return "\n".join(parts) + "\n"


_FILLER = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
           "There and back again."]


def passkey_prompt(key: int, filler_sentences: int, depth: float, seed: int = 0) -> str:
    """The classic synthetic passkey-retrieval prompt: a number hidden at `depth` (0..1) inside
    repeated filler, then the question; the answer is str(key)."""
    r = random.Random(seed)
    body = [r.choice(_FILLER) for _ in range(filler_sentences)]
    at = int(depth * filler_sentences)
    body.insert(at, f"The pass key is {key}. Remember it. {key} is the pass key.")
    head = ("There is important information hidden inside a lot of irrelevant text. Find it "
            "and memorize it. I will quiz you about it.")
    return head + " " + " ".join(body) + " What is the pass key? The pass key is"


def retrieval_ids(encode, filler_ids, length: int, *, needles: int = 4,
                  seed: int = 0, spans: bool = False):
    """A synthetic retrieval sample of exactly `length` tokens for calibration (DuoAttention
    calibrates on passkey retrieval): `needles` facts "The pass key of NAME is NUMBER. ..."
    hidden in the first 70% of natural filler text (`filler_ids`: token ids of calibration
    text, at least `length` of them), each asked for, with its answer, at a random later
    point. `encode` maps text to token ids without special tokens (`lambda t: tok(t,
    add_special_tokens=False).input_ids`: a BOS inside the text would be out of place).
    The attention that retrieves a fact from far back is what a gate or a tuner calibrated on
    ordinary prose rarely sees. spans=True also returns, per needle, (fact start, fact end,
    answer start, answer end): token positions (end exclusive) of the fact sentences and of
    the key's tokens in its answer."""
    if needles < 1:
        raise ValueError(f"needles must be at least 1, not {needles}")
    filler_ids = list(filler_ids)
    r = random.Random(seed)
    names = r.sample(_FIRST, min(needles, len(_FIRST)))
    keys = [r.randint(10000, 99999) for _ in names]
    facts = [list(encode(f" The pass key of {n} is {k}. Remember it. {k} is the pass key of "
                         f"{n}. ")) for n, k in zip(names, keys, strict=True)]
    asks = [list(encode(f" What is the pass key of {n}? The pass key of {n} is {k}. "))
            for n, k in zip(names, keys, strict=True)]
    extra = sum(map(len, facts)) + sum(map(len, asks))
    room = length - extra
    if room < 2 * len(names) or len(filler_ids) < room:
        raise ValueError(f"a retrieval sample of {length} tokens needs {extra} tokens of facts "
                         f"and questions and {max(room, 0)} of filler (given "
                         f"{len(filler_ids)})")
    start = r.randint(0, len(filler_ids) - room)
    fill = filler_ids[start:start + room]
    pieces = []  # (position in the filler, ids): each question after its fact
    for i, at in enumerate(sorted(r.sample(range(max(1, int(0.7 * room))), len(names)))):
        pieces.append((at, 0, i, facts[i]))
        pieces.append((r.randint(at + 1, room), 1, i, asks[i]))
    out: list[int] = []
    where: dict[tuple[int, int], int] = {}  # (needle, fact 0 / ask 1) -> start in out
    last = 0
    for at, kind, i, ids in sorted(pieces, key=lambda x: (x[0], x[1])):
        out += fill[last:at]
        where[(i, kind)] = len(out)
        out += ids
        last = at
    out += fill[last:]
    if not spans:
        return out
    found = []
    for i, k in enumerate(keys):
        key = list(encode(f" {k}"))
        ask = asks[i]
        # The key's tokens in its answer: the last place they occur in the question and answer
        # (tokenizers split at the space before a number, so they appear as encoded alone).
        at = max((j for j in range(len(ask) - len(key) + 1) if ask[j:j + len(key)] == key),
                 default=None)
        if at is None:
            raise ValueError(f"the tokenizer does not keep the key {k} apart in its answer")
        f0, a0 = where[(i, 0)], where[(i, 1)] + at
        found.append((f0, f0 + len(facts[i]), a0, a0 + len(key)))
    return out, found


FILLERS = ("text", "repeat", "both")


def repeat_filler(encode, tokens: int, seed: int = 0) -> list[int]:
    """At least `tokens` token ids of the passkey test's kind of filler: short sentences
    ("The grass is green.") drawn at random and repeated, as in passkey_prompt, but from a
    seed of its own."""
    r = random.Random(seed)
    sentences: list[str] = []
    ids: list[int] = []
    while len(ids) < tokens:
        sentences += [r.choice(_FILLER) for _ in range(max(16, (tokens - len(ids)) // 4))]
        ids = list(encode(" " + " ".join(sentences)))
    return ids


def retrieval_samples(encode, filler_ids, length: int, count: int, seed: int = 0,
                      filler: str = "text") -> list:
    """`count` retrieval samples with their spans (retrieval_ids(..., spans=True)). `filler`:
    "text" hides the facts in `filler_ids` (calibration text), seeds seed + 1000 + i, apart
    from the gates' own retrieval samples (seed + i), so the heads are not ranked on text a
    gate was trained on; "repeat" in repeated short sentences (repeat_filler, seeds
    seed + 2000 + i), the filler of the classic passkey test, where attention behaves unlike
    on prose (DuoAttention calibrates on such samples); "both" alternates the two, starting
    with text (so the first N samples of --retrieval-eval N hold both kinds)."""
    return _samples(encode, filler_ids, length, count, filler, seed + 1000, seed + 2000,
                    spans=True)


def _samples(encode, filler_ids, length: int, count: int, filler: str, text_seed: int,
             repeat_seed: int, *, spans: bool) -> list:
    """retrieval_ids samples hidden in `filler_ids` (seeds text_seed + j), in repeated short
    sentences (seeds repeat_seed + j) or alternately in both, starting with text."""
    if filler not in FILLERS:
        raise ValueError(f"unknown retrieval filler '{filler}' ({', '.join(FILLERS)})")
    filler_ids = list(filler_ids)
    out = []
    for i in range(count):
        kind = filler if filler != "both" else ("text", "repeat")[i % 2]
        j = i if filler != "both" else i // 2
        if kind == "text":
            out.append(retrieval_ids(encode, filler_ids, length, seed=text_seed + j,
                                     spans=spans))
        else:
            ids = repeat_filler(encode, length, seed=repeat_seed + j)
            out.append(retrieval_ids(encode, ids, length, seed=repeat_seed + j, spans=spans))
    return out


def gate_retrieval_ids(encode, filler_ids, length: int, count: int, seed: int = 0,
                       filler: str = "text") -> list[list[int]]:
    """`count` retrieval samples of `length` tokens for training gates (train_gate's
    extra_ids). `filler`: "text" hides the facts in `filler_ids` (seeds seed + i), "repeat" in
    the passkey test's kind of repeated short sentences (repeat_filler; seeds seed + 3000 + i),
    "both" alternates the two, starting with text. The seeds stay apart from the samples that
    rank retrieval heads (retrieval_samples: seed + 1000 + j and seed + 2000 + j), so heads are
    never ranked on a fact a gate was trained on."""
    return _samples(encode, filler_ids, length, count, filler, seed, seed + 3000, spans=False)


def _docs_groups(topics: dict[str, str], min_chars: int = 100) -> list[list[str]]:
    """Topics of pydoc_data that share a paragraph (of >= min_chars characters), joined into
    groups (the reference repeats sections: `specialnames` contains `customization`, ...)."""
    parent = {k: k for k in topics}

    def find(k: str) -> str:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    owner: dict[str, str] = {}
    for k in sorted(topics):
        for para in topics[k].split("\n\n"):
            para = para.strip()
            if len(para) < min_chars:
                continue
            if para in owner:
                parent[find(k)] = find(owner[para])
            else:
                owner[para] = k
    groups: dict[str, list[str]] = {}
    for k in sorted(topics):
        groups.setdefault(find(k), []).append(k)
    return list(groups.values())


def python_docs(topics: dict[str, str] | None = None) -> tuple[str, str]:
    """(calibration, held-out) English prose from CPython's `pydoc_data.topics` (the Python
    language reference, PSF licence). Topics that share paragraphs stay on one side, repeated
    paragraphs are kept once, and the groups are dealt largest first to the shorter side, so
    the two parts are disjoint and of similar size."""
    if topics is None:
        from pydoc_data.topics import topics as _t

        topics = dict(_t)
    sides: list[list[str]] = [[], []]
    size = [0, 0]
    groups = []
    for g in _docs_groups(topics):
        seen: set[str] = set()
        parts = []
        # the largest topic of a group first: it usually contains the others' sections
        for k in sorted(g, key=lambda k: (-len(topics[k]), k)):
            keep = [p for p in topics[k].split("\n\n")
                    if len(p.strip()) < 100 or p.strip() not in seen]
            seen.update(p.strip() for p in keep)
            text = "\n\n".join(keep).strip()
            if text:
                parts.append(text)
        body = "\n\n".join(parts)
        groups.append((len(body), g[0], body))
    for n, _k, body in sorted(groups, key=lambda x: (-x[0], x[1])):
        i = 0 if size[0] <= size[1] else 1
        sides[i].append(body)
        size[i] += n
    return "\n\n".join(sides[0]) + "\n", "\n\n".join(sides[1]) + "\n"


# Shipped texts: name -> (calibration file, held-out file) in autotune/data.
TEXTS = {"chronicle": ("calib.txt", "heldout.txt"),
         "docs": ("calib_docs.txt", "heldout_docs.txt")}
DEFAULT_TEXT = "docs"


def data_dir() -> Path:
    return Path(str(resources.files("attnc.autotune") / "data"))


def shipped(name: str) -> str:
    """A text file shipped in autotune/data (calib.txt, heldout_docs.txt, ...)."""
    return (data_dir() / name).read_text()


def shipped_text(text: str = DEFAULT_TEXT) -> tuple[str, str]:
    """(calibration, held-out) of a shipped text: "docs" (Python reference prose) or
    "chronicle" (the generated town chronicle)."""
    if text not in TEXTS:
        raise ValueError(f"unknown text '{text}'; shipped: {sorted(TEXTS)}")
    calib, held = TEXTS[text]
    return shipped(calib), shipped(held)


def write_shipped(chars: int = 120_000) -> list[Path]:
    """(Re)generate the shipped texts: the chronicle from its seeds, the docs from this
    Python's pydoc_data (the shipped docs files come from CPython 3.11.7)."""
    d = data_dir()
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for name, seed in (("calib.txt", 1), ("heldout.txt", 2)):
        p = d / name
        p.write_text(chronicle(chars, seed))
        out.append(p)
    for name, text in zip(TEXTS["docs"], python_docs(), strict=True):
        p = d / name
        p.write_text(text)
        out.append(p)
    return out


if __name__ == "__main__":
    for p in write_shipped():
        print(p)
