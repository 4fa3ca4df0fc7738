"""Stable hashes: per-sample seeds and the identities that key cached data.

Python's built-in `hash` is salted per process, so everything here goes through SHA-256.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def sha256_text(text: str) -> str:
    """Hex SHA-256 of UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def derive_seed(*parts: object) -> int:
    """A 64-bit seed from (base seed, task, length, index, ...): any sample regenerates alone."""
    digest = hashlib.sha256(json.dumps([str(p) for p in parts]).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def tokenizer_id(tokenizer: Any) -> str:
    """The name or path the tokenizer was loaded from ('' for one built in memory)."""
    return str(getattr(tokenizer, "name_or_path", "") or "")


def vocab_sha256(tokenizer: Any) -> str:
    """Hash of the token→id map: two tokenizers with the same name can still differ."""
    return sha256_text(json.dumps(sorted(tokenizer.get_vocab().items())))


def chat_template_sha256(tokenizer: Any) -> str | None:
    """Hash of the chat template (None without one): the template changes every prompt length."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    if not isinstance(template, str):
        template = json.dumps(template, sort_keys=True)
    return sha256_text(template)
