"""split_prompt: the §13 context/question cut, with and without a chat template."""

from __future__ import annotations

import pytest

from kvbench.tasks import TaskError, split_prompt

CONTEXT = "Some context line.\nMore {braces} and ünïcode.\n"
QUESTION = "What is it?"
ANSWER_PREFIX = " It is"


def decoded(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def test_chat_template_split_round_trips_to_the_full_rendered_prompt(tasks_chat_tokenizer):
    parts = split_prompt(tasks_chat_tokenizer, CONTEXT, QUESTION, ANSWER_PREFIX)
    assert parts.context_text == "<|im_start|>user\n" + CONTEXT
    assert parts.question_text == QUESTION + "<|im_end|>\n<|im_start|>assistant\n" + ANSWER_PREFIX
    rendered = tasks_chat_tokenizer.apply_chat_template(
        [{"role": "user", "content": CONTEXT + QUESTION}], add_generation_prompt=True, tokenize=False
    )
    assert decoded(tasks_chat_tokenizer, parts.context_ids + parts.question_ids) == rendered + ANSWER_PREFIX
    assert decoded(tasks_chat_tokenizer, parts.context_ids) == parts.context_text
    assert parts.context_ids[0] == tasks_chat_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tasks_chat_tokenizer.bos_token_id not in parts.context_ids  # no special tokens added


def test_query_aware_moves_the_question_into_the_context(tasks_chat_tokenizer):
    parts = split_prompt(tasks_chat_tokenizer, CONTEXT, QUESTION, ANSWER_PREFIX, query_aware=True)
    assert parts.context_text == "<|im_start|>user\n" + CONTEXT + QUESTION
    assert parts.question_text == "<|im_end|>\n<|im_start|>assistant\n" + ANSWER_PREFIX
    plain = split_prompt(tasks_chat_tokenizer, CONTEXT, QUESTION, ANSWER_PREFIX)
    assert decoded(tasks_chat_tokenizer, parts.context_ids + parts.question_ids) == decoded(
        tasks_chat_tokenizer, plain.context_ids + plain.question_ids
    )


def test_without_chat_template_bos_context_then_newline(tasks_plain_tokenizer):
    parts = split_prompt(tasks_plain_tokenizer, CONTEXT, QUESTION, ANSWER_PREFIX)
    assert parts.context_text == "<s>" + CONTEXT
    assert parts.question_text == QUESTION + "\n" + ANSWER_PREFIX
    assert parts.context_ids[0] == tasks_plain_tokenizer.bos_token_id
    assert parts.context_ids.count(tasks_plain_tokenizer.bos_token_id) == 1
    assert decoded(tasks_plain_tokenizer, parts.context_ids + parts.question_ids) == (
        "<s>" + CONTEXT + QUESTION + "\n" + ANSWER_PREFIX
    )


@pytest.mark.parametrize("query_aware", [False, True])
def test_free_text_prompt_with_empty_question_and_prefix(tasks_chat_tokenizer, query_aware):
    parts = split_prompt(tasks_chat_tokenizer, "Tell me a story.", "", "", query_aware=query_aware)
    assert parts.context_text == "<|im_start|>user\nTell me a story."
    assert parts.question_text == "<|im_end|>\n<|im_start|>assistant\n"
    assert parts.question_ids and decoded(tasks_chat_tokenizer, parts.question_ids) == parts.question_text


def test_context_ending_in_separator_characters_is_kept_whole(tasks_chat_tokenizer):
    parts = split_prompt(tasks_chat_tokenizer, "heading ###", "Q", "")
    assert parts.context_text == "<|im_start|>user\nheading ###"
    assert parts.question_text.startswith("Q<|im_end|>")


def test_template_that_drops_the_message_is_a_task_error(tasks_chat_tokenizer):
    from transformers import PreTrainedTokenizerFast

    broken = PreTrainedTokenizerFast(tokenizer_object=tasks_chat_tokenizer.backend_tokenizer)
    broken.chat_template = "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    with pytest.raises(TaskError, match="chat template"):
        split_prompt(broken, CONTEXT, QUESTION, ANSWER_PREFIX)
