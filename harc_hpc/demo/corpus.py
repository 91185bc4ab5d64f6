"""Synthetic text domains for the demo sources: math-like, code-like and plain English.

Each generator is a pure function of a ``random.Random``, so a corpus is reproducible from its seed
on any platform (Python's Mersenne Twister and its integer/choice methods are stable across
versions). The domains are kept ASCII, because the demo tokenizer is one token per ASCII byte.
The point is not realism but *distinguishable* statistics: digits and operators, indentation and
keywords, and lower-case prose should end up preferring different experts once fine-tuned.
"""

from __future__ import annotations

import random
from typing import Callable, Iterator

_NAMES = ["Tom", "Ana", "Li", "Sam", "Eva", "Raj", "Mia", "Ben", "Zoe", "Ivan"]
_THINGS = ["apples", "books", "coins", "cards", "pens", "eggs", "shells", "stamps"]
_NOUNS = ["cat", "river", "house", "garden", "teacher", "window", "road", "city", "friend", "song",
          "morning", "forest", "letter", "market", "child", "boat", "story", "table", "hill", "bird"]
_ADJS = ["small", "quiet", "old", "bright", "green", "long", "warm", "happy", "dark", "gentle", "busy"]
_VERBS = ["sees", "finds", "likes", "opens", "paints", "follows", "hears", "visits", "carries", "reads"]
_ADVS = ["slowly", "often", "today", "again", "softly", "later", "never", "always"]
_PREPS = ["near", "under", "behind", "across", "beside", "over"]
_IDENTS = ["x", "y", "n", "i", "j", "k", "total", "count", "items", "value", "acc", "row", "data", "key"]
_FUNCS = ["add", "scale", "clamp", "mean", "count_odd", "merge", "flatten", "norm", "step", "update"]


def math_sample(rng: random.Random) -> str:
    kind = rng.randrange(7)
    a, b = rng.randint(0, 99), rng.randint(1, 99)
    if kind == 0:
        return f"{a}+{b}={a + b}"
    if kind == 1:
        return f"{a}-{b}={a - b}"
    if kind == 2:
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        return f"{a}*{b}={a * b}"
    if kind == 3:
        name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
        return f"{name} has {a} {thing} and gets {b} more. Now {name} has {a + b} {thing}."
    if kind == 4:
        c = a + b
        return f"Solve x+{a}={c}. x={b}."
    if kind == 5:
        q, r = rng.randint(2, 12), rng.randint(2, 12)
        return f"{q * r}/{q}={r}"
    return f"({a}+{b})*2={(a + b) * 2}"


def code_sample(rng: random.Random) -> str:
    kind = rng.randrange(6)
    f, v, w = rng.choice(_FUNCS), rng.choice(_IDENTS), rng.choice(_IDENTS)
    n = rng.randint(1, 20)
    if kind == 0:
        return f"def {f}({v}, {w}):\n    return {v} + {w}\n"
    if kind == 1:
        return f"for i in range({n}):\n    {v} = {v} * i\n    print({v})\n"
    if kind == 2:
        return f"if {v} > {n}:\n    {w} = {v} - {n}\nelse:\n    {w} = 0\n"
    if kind == 3:
        return f"while {v} < {n}:\n    {v} += 1\n"
    if kind == 4:
        vals = ", ".join(str(rng.randint(0, 9)) for _ in range(rng.randint(2, 5)))
        return f"{v} = [{vals}]\n{w} = sum({v}) // len({v})\n"
    return f"def {f}(self, {v}):\n    self.{w} = {v}\n    return self\n"


def text_sample(rng: random.Random) -> str:
    def phrase():
        return f"the {rng.choice(_ADJS)} {rng.choice(_NOUNS)}"

    s = f"{phrase()} {rng.choice(_VERBS)} {phrase()}"
    if rng.random() < 0.5:
        s += f" {rng.choice(_PREPS)} {phrase()}"
    if rng.random() < 0.4:
        s += f" {rng.choice(_ADVS)}"
    return s[0].upper() + s[1:] + "."


GENERATORS: dict[str, Callable[[random.Random], str]] = {
    "math": math_sample,
    "code": code_sample,
    "text": text_sample,
}

# What separates consecutive samples in a packed stream (code samples end with their own newline).
_SEPARATOR = {"math": " ", "code": "\n", "text": " "}


def sample_stream(domain: str, rng: random.Random) -> Iterator[str]:
    gen = GENERATORS[domain]
    sep = _SEPARATOR[domain]
    while True:
        yield gen(rng) + sep


def packed_windows(domain: str, count: int, length: int, seed: str) -> list[str]:
    """``count`` strings of exactly ``length`` characters cut from one packed stream of samples.

    Windows start at sample boundaries, like a document-aligned packing: each window begins with a
    fresh sample and runs on into the following ones.
    """
    rng = random.Random(seed)
    stream = sample_stream(domain, rng)
    out = []
    for _ in range(count):
        buf = ""
        while len(buf) < length:
            buf += next(stream)
        out.append(buf[:length])
    return out


def mixed_windows(mix: dict[str, float], count: int, length: int, seed: str) -> list[str]:
    """Windows drawn from several domains with the given probabilities (each window one domain)."""
    rng = random.Random(seed)
    domains = sorted(mix)
    weights = [mix[d] for d in domains]
    streams = {d: sample_stream(d, random.Random(f"{seed}/{d}")) for d in domains}
    out = []
    for _ in range(count):
        d = rng.choices(domains, weights)[0]
        buf = ""
        while len(buf) < length:
            buf += next(streams[d])
        out.append(buf[:length])
    return out
