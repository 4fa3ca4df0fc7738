"""Exactness on the embedded model: SmolLM2-135M-Instruct from its GGUF (30 layers, 9 query / 3 KV heads)."""

from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from kvbench.harness.cache.kv_cache import KVBenchCache, cache_argument
from kvbench.harness.engine.decode import greedy_decode
from kvbench.harness.engine.pipeline import run_context
from kvbench.harness.engine.prefill import ObservationNeeds, prefill
from kvbench.harness.models.loading import load_model, save_model
from kvbench.methods import REGISTRY, get_method, load_all
from kvbench.tasks.prompting import split_prompt

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "passkey.txt"
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m", "cpu", "float32")


@pytest.fixture(scope="module")
def prompt(smollm2):
    return split_prompt(smollm2.tokenizer, EXAMPLE.read_text(), "\nWhat is the pass key?", " The pass key is")


def test_embedded_model_architecture(smollm2):
    config = smollm2.model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert smollm2.dtype == torch.float32 and smollm2.max_length == 8192


def test_full_equals_transformers_generate_on_smollm2(smollm2, prompt):
    """Same tokens as one-shot generate; logits equal to generate continuing from the same context prefill.

    kvbench prefills the context, then feeds the question: a different GEMM chunking than one forward over
    context + question, which moves fp32 logits by ~2e-5 on this model. Against transformers' own
    generate continuing a DynamicCache prefilled with the context, the computation is the same.
    """
    ids = torch.tensor([prompt.context_ids + prompt.question_ids])
    options = dict(do_sample=False, max_new_tokens=NEW_TOKENS, output_logits=True, return_dict_in_generate=True)
    one_shot = smollm2.model.generate(ids, attention_mask=torch.ones_like(ids), **options)
    context_cache = DynamicCache(config=smollm2.model.config)
    with torch.no_grad():
        smollm2.model(torch.tensor([prompt.context_ids]), **cache_argument(smollm2.model, context_cache))
    continued = smollm2.model.generate(
        ids, attention_mask=torch.ones_like(ids), **cache_argument(smollm2.model, context_cache), **options
    )

    observation = prefill(smollm2.model, prompt.context_ids, ObservationNeeds())
    cache = KVBenchCache(30, get_method("full").compress(observation, 1.0), observation.context_length)
    generation = greedy_decode(smollm2.model, cache, prompt.question_ids, NEW_TOKENS, [], keep_logits=True)

    assert generation.token_ids == one_shot.sequences[0, ids.shape[1] :].tolist()
    assert generation.token_ids == continued.sequences[0, ids.shape[1] :].tolist()
    assert "68142" in smollm2.tokenizer.decode(generation.token_ids)  # the full cache retrieves the pass key
    for ours, theirs in zip(generation.step_logits, continued.logits):
        torch.testing.assert_close(ours, theirs[0], rtol=0, atol=1e-5)
    for ours, theirs in zip(generation.step_logits, one_shot.logits):
        torch.testing.assert_close(ours, theirs[0], rtol=0, atol=1e-4)


def test_every_method_at_budget_one_answers_like_full(smollm2, prompt):
    """Methods that need calibration are left out here (minutes of CPU on this model); the contract tests
    check them at budget 1 on tiny models."""
    load_all()
    cells = [(get_method(name), 1.0) for name in sorted(REGISTRY) if not REGISTRY[name].needs_calibration]
    results = run_context(smollm2, prompt.context_ids, prompt.question_ids, cells, NEW_TOKENS)
    full = next(r for r in results if r.method == "full")
    for result in results:
        assert result.token_ids == full.token_ids, result.method
        assert result.kv_bytes == result.kv_bytes_full


def test_the_embedded_gguf_model_saves_as_a_plain_model_that_loads_back(smollm2, tmp_path):
    """`kvbench train` saves what it fine-tuned; transformers refuses to save a model read from GGUF as is. The
    model comes from kvbench's converted copy or straight from the GGUF file (KVBENCH_NO_MODEL_CACHE=1): either
    way saving leaves its marks as they were."""
    marks = getattr(smollm2.model, "hf_quantizer", None)
    save_model(smollm2, tmp_path)
    assert getattr(smollm2.model, "hf_quantizer", None) is marks
    reloaded = load_model(str(tmp_path), "cpu", "float32")
    ids = torch.tensor([smollm2.tokenizer.encode("The pass key is 68142.")])
    with torch.no_grad():
        assert torch.equal(smollm2.model(ids).logits, reloaded.model(ids).logits)
    assert reloaded.tokenizer.encode("pass key") == smollm2.tokenizer.encode("pass key")
