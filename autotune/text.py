"""Generated calibration, held-out and passkey text (seeded, no downloads, licence-clean)."""

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


def data_dir() -> Path:
    return Path(str(resources.files("attnc.autotune") / "data"))


def shipped(name: str) -> str:
    """A text file shipped in autotune/data (calib.txt, heldout.txt)."""
    return (data_dir() / name).read_text()


def write_shipped(chars: int = 120_000) -> list[Path]:
    """(Re)generate the shipped calibration and held-out text."""
    d = data_dir()
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for name, seed in (("calib.txt", 1), ("heldout.txt", 2)):
        p = d / name
        p.write_text(chronicle(chars, seed))
        out.append(p)
    return out


if __name__ == "__main__":
    for p in write_shipped():
        print(p)
