"""Batched decoding on the embedded model: every registered method, learned ones included, as one row of a single
batch, gives the greedy tokens and (within 1e-5 of the largest logit, fp32) the logits it gives decoding alone.

The reference is the unbatched path (`run_cell`), itself checked against transformers' generate on this model in
test_smollm2.py. The calibrations and trainings are shrunk to seconds (a few hundred tokens, one epoch): what is
checked is that each method's representation decodes alike in and out of the batch, not how well it was trained.
"""

import os
from pathlib import Path

import pytest

from kvbench.harness.artifacts.calibration import ensure_calibrated
from kvbench.harness.engine.pipeline import TimedObservation, compress_context, run_batch, run_cell
from kvbench.harness.engine.prefill import ObservationNeeds, prefill
from kvbench.harness.errors import BudgetError
from kvbench.harness.models.loading import load_model
from kvbench.methods import REGISTRY, get_method, load_all
from kvbench.tasks.prompting import split_prompt

load_all()
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "passkey.txt"
NEW_TOKENS = 6
BUDGET = 0.25
# fp32 through 30 layers: a row's matmuls in a batch sum in another order than alone. Measured on this prompt: the
# full cache's row drifts 4.9e-5 on logits up to 37, the most ragged row (adaptive_policy) 1.2e-4 on logits up to 30.
# Allowed: 1e-5 of the step's largest logit (about 3e-4), and the greedy tokens exactly equal.
LOGITS_RTOL = 1e-5

# Calibrations and trainings small enough for seconds on 2 CPU cores.
SMALL = {
    "zack": {"calibration_samples": 2, "calibration_tokens": 512},
    "uncomp": {"calibration_samples": 2, "calibration_tokens": 512},
    "razor": {"probe_length": 128, "probe_repeats": 2},
    "autoencoder": {"latent_dim": 16, "latent_bits": 4, "tokens": 1024, "window": 256, "epochs": 1},
    "lightweight": {"samples": 3, "length": 1024, "response_tokens": 8, "epochs": 1},
    "adaptive_policy": {"texts": 4, "length": 512, "t_q": 32, "epochs": 2},
}
EXTRA = [("h2o", {"decode_evict": True}), ("tova", {"decode_evict": True})]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    previous = os.environ.get("KVBENCH_CACHE_DIR")
    models = Path(previous or Path.home() / ".cache" / "kvbench") / "models"
    cache = tmp_path_factory.mktemp("calibration")
    if models.is_dir():  # the converted weights, so that the model loads in seconds
        (cache / "models").symlink_to(models)
    os.environ["KVBENCH_CACHE_DIR"] = str(cache)
    yield load_model("smollm2-135m", "cpu", "float32")
    if previous is None:
        del os.environ["KVBENCH_CACHE_DIR"]
    else:
        os.environ["KVBENCH_CACHE_DIR"] = previous


@pytest.fixture(scope="module")
def prompt(smollm2):
    return split_prompt(smollm2.tokenizer, EXAMPLE.read_text(), "\nWhat is the pass key?", " The pass key is")


def every_method():
    made = [get_method(name, **SMALL.get(name, {})) for name in sorted(REGISTRY)]
    return made + [get_method(name, **options) for name, options in EXTRA]


@pytest.fixture(scope="module")
def methods(smollm2):
    made = every_method()
    for method in made:
        ensure_calibrated(smollm2, method, say=lambda _: None)
    return made


@pytest.fixture(scope="module")
def cells(smollm2, prompt, methods):
    """(alone, batched) results per method label, from one shared prefill."""
    context = prompt.context_ids
    needs = ObservationNeeds()
    for method in methods:
        if not method.needs().own_prefill:
            needs = needs.union(method.needs())
    shared = TimedObservation(prefill(smollm2.model, context, needs), 0.0)
    alone, compressed = {}, []
    for method in methods:
        effective = BUDGET if method.uses_budget else 1.0
        own = method.prefills_itself(smollm2.model.config, len(context), effective)
        observed = None if own else shared
        try:
            alone[method.label] = run_cell(
                smollm2,
                observed,
                method,
                effective,
                prompt.question_ids,
                NEW_TOKENS,
                keep_logits=True,
                context_ids=context,
            )
        except BudgetError:
            continue
        compressed.append((method, effective, compress_context(smollm2, observed, method, effective, context)))
    batched = run_batch(smollm2, compressed, prompt.question_ids, NEW_TOKENS, keep_logits=True)
    return alone, {method.label: result for (method, _, _), result in zip(compressed, batched)}


@pytest.mark.slow
def test_every_method_decodes_in_the_batch_as_alone_on_smollm2(cells):
    alone, together = cells
    # Every registered method took the budget on this model (none fell out of the batch), plus the decode-time ones.
    assert set(together) == set(alone)
    assert {result.method for result in together.values()} == set(REGISTRY)
    assert sum("decode_evict" in label for label in together) == 2
    assert any(r.head_spread and r.head_spread["max"] > r.head_spread["min"] for r in together.values())  # ragged
    mismatched = []
    for label, single in alone.items():
        batched = together[label]
        assert len(batched.step_logits) == len(single.step_logits) == len(single.token_ids) >= 1, label
        worst = max(
            (ours - ref).abs().max().item() / ref.abs().max().item()
            for ours, ref in zip(batched.step_logits, single.step_logits)
        )
        if batched.token_ids != single.token_ids or worst > LOGITS_RTOL:
            mismatched.append((label, batched.token_ids, single.token_ids, worst))
        assert (batched.kv_bytes, batched.kv_bytes_peak, batched.head_spread) == (
            single.kv_bytes,
            single.kv_bytes_peak,
            single.head_spread,
        ), label
        assert batched.decode_batch == len(together) and single.decode_batch == 1
    assert not mismatched, mismatched
