"""Context reconstruction: repeat a marked passage of a long document, scored with ROUGE and BERTScore.

A needle lookup survives as long as one short key stays in the cache; repeating a whole passage needs every
one of its tokens, so it shows eviction damage at budgets where retrieval still looks perfect. The passage
comes from the second half of the essay corpus and the document around it from the first words of the corpus
(as the NIAH essay haystack), so the passage is not elsewhere in documents shorter than half the corpus.
"""

from __future__ import annotations

from random import Random

from kvbench.tasks.generated.fitting import Draft, Setup, UnitPlan
from kvbench.tasks.generated.haystacks import essay_text, essay_words, split_sentences
from kvbench.tasks.generated.niah import ESSAY_DEPTHS

OPEN, CLOSE = "[PASSAGE]", "[/PASSAGE]"
INSTRUCTION = (
    f"Below is a document. One passage in it is marked: it starts after {OPEN} and ends before {CLOSE}. "
    "Read the document carefully; you will be asked to repeat the marked passage exactly.\n\n"
)
QUESTION = "Repeat the marked passage word for word, and nothing else."
ANSWER_PREFIX = " The marked passage is:"
PASSAGE_WORDS = 40


def draw_passage(rng: Random) -> str:
    """PASSAGE_WORDS consecutive words of the second half of the essay corpus."""
    words = essay_words()
    start = rng.randrange(len(words) // 2, len(words) - PASSAGE_WORDS)
    return " ".join(words[start : start + PASSAGE_WORDS])


def render(rng: Random, units: int) -> Draft:
    """A document of `units` essay words with the marked passage between two sentences at a drawn depth."""
    passage = draw_passage(rng)
    depth = rng.choice(ESSAY_DEPTHS)
    sentences = split_sentences(essay_text(units))
    cut = int(len(sentences) * depth / 100)
    document = " ".join([*sentences[:cut], f"{OPEN} {passage} {CLOSE}", *sentences[cut:]])
    return Draft(
        context=INSTRUCTION + document + "\n",
        question=QUESTION,
        answer_prefix=ANSWER_PREFIX,
        references=[passage],
        metadata={"depths": [float(depth)]},
    )


def plan(setup: Setup) -> UnitPlan:
    """The document grows by 100 words (500 from 4K tokens on), like the NIAH essay haystack."""
    return UnitPlan(render=render, increment=100 if setup.length < 4096 else 500)
