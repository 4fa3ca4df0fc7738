"""Context/question split with the model's chat template (tasks.md §13, kvpress semantics).

Compression must see only the context, yet the model must see the exact prompt its chat
template would build. Rendering the context followed by a long unique separator and cutting
the rendered text there yields both halves of the template without parsing it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvbench.tasks.errors import TaskError

_SEPARATOR_CHAR = "#"
_PLAIN_QUESTION_SUFFIX = "\n"


@dataclass(frozen=True)
class PromptParts:
    """The two token streams the harness feeds: the prefilled context, then the question."""

    context_text: str
    question_text: str
    context_ids: list[int]
    question_ids: list[int]


def _template_halves(tokenizer: Any, context: str, chat_template: bool = True) -> tuple[str, str]:
    """(template prefix + context, end of user turn + assistant header)."""
    if not chat_template:  # the task asks for its raw prompt (LongBench's few-shot and code subsets)
        return (getattr(tokenizer, "bos_token", None) or "") + context, ""
    if not getattr(tokenizer, "chat_template", None):
        return (getattr(tokenizer, "bos_token", None) or "") + context, _PLAIN_QUESTION_SUFFIX
    separator = _SEPARATOR_CHAR * (len(context) + 10)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": context + separator}],
        add_generation_prompt=True,
        tokenize=False,
    )
    # rfind: a context that itself ends in '#' must not pull the cut point into the context.
    cut = rendered.rfind(separator)
    if cut < 0:
        raise TaskError("the tokenizer's chat template does not echo the user message; cannot split the prompt")
    return rendered[:cut], rendered[cut + len(separator) :]


def split_prompt(
    tokenizer: Any,
    context: str,
    question: str,
    answer_prefix: str,
    query_aware: bool = False,
    chat_template: bool = True,
) -> PromptParts:
    """Render and tokenize a prompt as context ids + question ids (both without special tokens added).

    `query_aware=True` moves the question into the context, so compression sees it and only
    the template's turn suffix and the answer prefix follow. Empty question and answer
    prefix are valid (free-text generation). `chat_template=False` feeds the raw prompt even where the tokenizer
    has a template (BOS + context, then question + answer prefix, nothing between).
    """
    if query_aware:
        context, question = context + question, ""
    context_text, question_suffix = _template_halves(tokenizer, context, chat_template)
    question_text = question + question_suffix + answer_prefix
    return PromptParts(
        context_text=context_text,
        question_text=question_text,
        context_ids=list(tokenizer.encode(context_text, add_special_tokens=False)),
        question_ids=list(tokenizer.encode(question_text, add_special_tokens=False)),
    )
