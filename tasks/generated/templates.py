"""Filling RULER task templates and cutting them into context and question (tasks.md §4.8)."""

from __future__ import annotations


def fill_template(template: str, context: str, **fields: object) -> tuple[str, str]:
    """Return (text up to and including the newline after the context, the rest).

    Only the template's own text is formatted: haystacks contain braces (the essay corpus is
    Python documentation) and must be inserted verbatim.
    """
    head, tail = template.split("{context}")
    head, tail = head.format(**fields), tail.format(**fields)
    cut = tail.index("\n") + 1
    return head + context + tail[:cut], tail[cut:]
