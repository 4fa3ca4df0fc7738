"""Shared fixtures. Task-suite fixtures: `tasks_chat_tokenizer`, `tasks_plain_tokenizer`; `tiny_model_dir`;
`chat_model_dir` (a tiny model with the task tokenizer and a chat template, for sweeps)."""

from __future__ import annotations

import pytest

TASKS_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tasks_tokenizer(chat_template: bool):
    """A byte-level BPE trained in milliseconds on the essay haystack and task templates.

    Byte-level so decode(encode(text)) == text, which the prompt-split tests rely on; built in
    memory so no test downloads a tokenizer.
    """
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [topics[key] for key in sorted(topics)]
    corpus.append("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.")
    corpus.append("One of the special magic numbers for key is: 1234567. VAR ABCDE = VAR FGHIJ 12345")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4000,
        special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    if chat_template:
        tokenizer.chat_template = TASKS_CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="session")
def tasks_chat_tokenizer():
    """Tiny byte-level BPE with a ChatML-style chat template."""
    return build_tasks_tokenizer(chat_template=True)


@pytest.fixture(scope="session")
def tasks_plain_tokenizer():
    """The same tokenizer without a chat template (BOS + context, suffix newline)."""
    return build_tasks_tokenizer(chat_template=False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama (GQA) with its tokenizer, saved where `--model DIR` loads it."""
    from tiny_models import tiny_model, tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama-gqa").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory):
    """A 2-layer tiny Llama (GQA) with the tasks' byte-level tokenizer and a chat template, saved for `--model DIR`:
    sweeps of the offline tasks run on it in seconds."""
    from tiny_models import tiny_model

    path = tmp_path_factory.mktemp("tiny-chat-model")
    tokenizer = build_tasks_tokenizer(chat_template=True)
    tiny_model("llama-gqa", layers=2, vocab=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
