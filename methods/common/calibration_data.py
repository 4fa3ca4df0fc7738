"""Offline calibration data: the prose of Python's `pydoc_data.topics`, tokenized, or seeded random tokens.

Calibration must never download a data set; the standard library's documentation topics are real English
text available on every Python installation.
"""

from __future__ import annotations

import random
import weakref

import torch

DATA_VERSION = "pydoc-topics-v1"


def calibration_text() -> str:
    """The documentation topics' prose in a fixed order, code samples (indented lines) dropped."""
    from pydoc_data.topics import topics

    lines = []
    for key in sorted(topics):
        lines += [line for line in topics[key].splitlines() if line and not line[0].isspace()]
    return "\n".join(lines)


_TOKENIZED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _prose_ids(tokenizer) -> list[int]:
    """The prose tokenized once per tokenizer: calibrating takes many windows of the same half-million characters."""
    if tokenizer not in _TOKENIZED:
        _TOKENIZED[tokenizer] = tokenizer.encode(calibration_text(), add_special_tokens=False)
    return _TOKENIZED[tokenizer]


def calibration_ids(tokenizer, num_tokens: int, seed: int = 0) -> list[int]:
    """`num_tokens` tokens of documentation prose starting at a seeded offset."""
    ids = _prose_ids(tokenizer)
    if len(ids) < num_tokens:
        ids = ids * (num_tokens // len(ids) + 1)
    start = random.Random(seed).randrange(0, len(ids) - num_tokens + 1)
    return ids[start : start + num_tokens]


def random_token_ids(vocab_size: int, num_tokens: int, seed: int = 0) -> torch.Tensor:
    """Seeded uniform tokens (e.g. the repeated random sequences of induction-head probes)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num_tokens,), generator=generator)
