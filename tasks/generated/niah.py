"""Needle in a haystack, RULER's 8 variants (tasks.md §4)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from random import Random

from kvbench.tasks.generated.fitting import Draft, Setup, UnitPlan
from kvbench.tasks.generated.haystacks import NOISE_SENTENCE, essay_text, split_sentences
from kvbench.tasks.generated.templates import fill_template
from kvbench.tasks.generated.words import niah_words

TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it."
    " I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."

# Plural → singular edits, in this order ("are all" before "are"), for a single expected value.
SINGULAR_EDITS = (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer"))

ESSAY_DEPTHS = tuple(round(100 * i / 39) for i in range(40))


@dataclass(frozen=True)
class NiahVariant:
    """One row of the NIAH task table: haystack, key/value types, keys/values/queries."""

    haystack: str
    key_type: str
    value_type: str
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1


def draw_value(rng: Random, kind: str) -> str:
    """A random needle key or value: 7-digit number, adj-noun word or UUID4."""
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return rng.choice(niah_words())
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle value type {kind!r}")


def _draw_unique(rng: Random, kind: str, count: int, taken: set[str]) -> list[str]:
    """Distinct draws, none in `taken` (a repeated key would make the question ambiguous)."""
    drawn: list[str] = []
    while len(drawn) < count:
        value = draw_value(rng, kind)
        if value not in taken:
            taken.add(value)
            drawn.append(value)
    return drawn


def join_keys(keys: list[str]) -> str:
    """`a` for one key, `a, b, and c` for several."""
    if len(keys) == 1:
        return keys[0]
    return ", ".join(keys[:-1]) + ", and " + keys[-1]


def singularize(text: str) -> str:
    """The template and answer prefix when exactly one value is asked for (§4.7)."""
    for plural, singular in SINGULAR_EDITS:
        text = text.replace(plural, singular)
    return text


def _insert_lines(rng: Random, lines: list[str], needles: list[str]) -> tuple[str, list[float]]:
    """Needles between haystack lines at random line indices; depths in % of haystack lines."""
    indices = sorted(rng.sample(range(len(lines)), len(needles)), reverse=True)
    depths = [100 * index / len(lines) for index in reversed(indices)]
    for index, needle in zip(indices, needles):
        lines.insert(index, needle)
    return "\n".join(lines), depths


def _insert_sentences(rng: Random, num_words: int, needles: list[str]) -> tuple[str, list[float]]:
    """Needles between essay sentences at depths drawn from RULER's 40-point grid."""
    sentences = split_sentences(essay_text(num_words))
    depths = sorted(rng.sample(ESSAY_DEPTHS, len(needles)))
    pieces: list[str] = []
    done = 0
    for depth, needle in zip(depths, needles):
        index = int(len(sentences) * depth / 100)
        pieces += sentences[done:index] + [needle]
        done = index
    pieces += sentences[done:]
    return " ".join(pieces), [float(depth) for depth in depths]


def _haystack(
    variant: NiahVariant, rng: Random, units: int, needles: list[str], keys: set[str]
) -> tuple[str, list[float]]:
    """The haystack with the needles in it; distractor needles never reuse a real key."""
    if variant.haystack == "noise":
        return _insert_lines(rng, [NOISE_SENTENCE] * units, needles)
    if variant.haystack == "needle":
        distractor_keys = _draw_unique(rng, variant.key_type, units, keys)
        lines = [
            NEEDLE.format(type_needle_v=variant.value_type, key=key, value=draw_value(rng, variant.value_type))
            for key in distractor_keys
        ]
        return _insert_lines(rng, lines, needles)
    return _insert_sentences(rng, units, needles)


def render(variant: NiahVariant, rng: Random, units: int) -> Draft:
    """One NIAH sample with `units` haystack units (lines, or essay words)."""
    keys = _draw_unique(rng, variant.key_type, max(variant.num_keys, variant.num_queries), set())
    taken_values: set[str] = set()
    values = {key: _draw_unique(rng, variant.value_type, variant.num_values, taken_values) for key in keys}
    needles = [
        NEEDLE.format(type_needle_v=variant.value_type, key=key, value=value) for key in keys for value in values[key]
    ]
    rng.shuffle(needles)
    queried = rng.sample(keys, variant.num_queries)
    references = [value for key in queried for value in values[key]]
    haystack, depths = _haystack(variant, rng, units, needles, set(keys))

    template, answer_prefix, type_needle_v = TEMPLATE, ANSWER_PREFIX, variant.value_type
    if variant.num_queries * variant.num_values == 1:
        template, answer_prefix, type_needle_v = singularize(template), singularize(answer_prefix), type_needle_v[:-1]
    query = join_keys(queried)
    context, question = fill_template(template, haystack, type_needle_v=type_needle_v, query=query)
    return Draft(
        context=context,
        question=question,
        answer_prefix=answer_prefix.format(type_needle_v=type_needle_v, query=query),
        references=references,
        metadata={"depths": [round(depth, 2) for depth in depths], "keys": queried},
    )


def plan(variant: NiahVariant, setup: Setup) -> UnitPlan:
    """Essay grows by 500 words (100 below 4K tokens), lines by 25 (5 below 4K)."""
    short = setup.length < 4096
    if variant.haystack == "essay":
        increment, min_units = (100 if short else 500), 1
    else:
        increment = 5 if short else 25
        min_units = max(variant.num_keys, variant.num_queries) * variant.num_values
    return UnitPlan(render=lambda rng, units: render(variant, rng, units), increment=increment, min_units=min_units)
