"""Filler text that needles hide in (tasks.md §3), all available offline.

The essay haystack substitutes RULER's Paul Graham corpus (scraped, not redistributable)
with the prose of CPython's `pydoc_data.topics`. Its content follows the Python version,
so its SHA-256 is recorded with every sample.
"""

from __future__ import annotations

import re
import string
from functools import cache, lru_cache

from kvbench.tasks.fingerprint import sha256_text
from kvbench.tasks.generated.words import wonderwords_sha256

NOISE_SENTENCE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

# A sentence ends at . ! or ? (optionally followed by a closing quote or bracket) when
# whitespace and then an uppercase letter, a digit or an opening quote follow. This replaces
# nltk's punkt model, which must be downloaded.
_SENTENCE_BREAK = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"'”’)\]]))\s+(?=[A-Z0-9\"'“‘])")


def split_sentences(text: str) -> list[str]:
    """Deterministic regex sentence splitter; the whitespace at each break is dropped."""
    return [sentence for sentence in _SENTENCE_BREAK.split(text) if sentence]


@lru_cache(maxsize=1)
def essay_words() -> tuple[str, ...]:
    """Prose words of `pydoc_data.topics`: topics in key order, indented lines (code, grammar) dropped."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[key] for key in sorted(topics))
    prose = (line for line in text.split("\n") if not line[:1].isspace())
    return tuple(" ".join(prose).split())


def essay_text(num_words: int) -> str:
    """The first `num_words` essay words, repeating the corpus when it is too short (as RULER does)."""
    words = essay_words()
    repeats = -(-num_words // len(words))
    return " ".join((words * repeats)[:num_words])


@cache
def _arithmetic_sha256() -> str:
    """The arithmetic chain has no haystack: its prompt's fixed text stands for one."""
    from kvbench.tasks.generated import chain

    return sha256_text(chain.INTRO + chain.QUESTION + chain.ANSWER_PREFIX)


def haystack_sha256(haystack: str) -> str:
    """Hash of what a haystack is made from (for fwe's random coded words: their alphabet)."""
    sources = {
        "noise": lambda: sha256_text(NOISE_SENTENCE),
        "essay": lambda: sha256_text(" ".join(essay_words())),
        "needle": wonderwords_sha256,
        "word_list": wonderwords_sha256,
        "coded_words": lambda: sha256_text(string.ascii_lowercase),
        "arithmetic": _arithmetic_sha256,
    }
    if haystack not in sources:
        raise KeyError(haystack)
    return sources[haystack]()
