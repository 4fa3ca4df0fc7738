"""The decode-time wrapper (`decoding`) and token budgets: its choice against a hand-computed one, the budget held
at every step of a long generation, and the wrapper equal to its base where the budget is never reached."""

import math

import pytest
import torch
from tiny_models import VOCAB, random_ids, tiny_model, tiny_tokenizer

from kvbench.harness.cache.kv_cache import KVBenchCache
from kvbench.harness.cache.prefix import TokenPrefix
from kvbench.harness.engine.decode import greedy_decode
from kvbench.harness.engine.pipeline import TimedObservation, compress_context, run_cell
from kvbench.harness.engine.prefill import Observation, ObservationNeeds, prefill
from kvbench.harness.errors import BudgetError, KVBenchError
from kvbench.harness.models.loading import LoadedModel
from kvbench.harness.runner.lists import parse_budgets
from kvbench.harness.runner.store import cell_key
from kvbench.harness.token_budget import TokenBudget, fraction_of, parse_budget
from kvbench.methods import get_method
from kvbench.methods.common.query_log import QueryLog

H_KV, GROUP, DIM = 2, 2, 8


def hand_snapkv(keys, queries, scaling, window, kernel, kept):
    """SnapKV's kept positions per KV head, from the definition with Python floats: each window query's softmax
    over the keys it can see, averaged over the window rows, over the tokens before the window; average pooling
    (zero padding counted, kvpress/torch's default); averaged over the KV head's query group; the window plus the
    best kept − window of the rest."""
    h_q, w, _ = queries.shape
    n = keys.shape[1]
    result = []
    for kv in range(H_KV):
        head_scores = [0.0] * (n - w)
        for g in range(GROUP):
            h = kv * GROUP + g
            mean = [0.0] * (n - w)
            for i in range(w):
                visible = n - w + i + 1
                logits = [float(queries[h, i] @ keys[kv, j]) * scaling for j in range(visible)]
                top = max(logits)
                weights = [math.exp(x - top) for x in logits]
                total = sum(weights)
                for j in range(n - w):
                    mean[j] += weights[j] / total / w
            half = kernel // 2
            pooled = [
                sum(mean[j + o] for o in range(-half, half + 1) if 0 <= j + o < n - w) / kernel for j in range(n - w)
            ]
            for j in range(n - w):
                head_scores[j] += pooled[j] / GROUP
        best = sorted(range(n - w), key=lambda j: -head_scores[j])[: kept - w]
        result.append(sorted(best) + list(range(n - w, n)))
    return result


def random_layer(n, w, seed):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(H_KV, n, DIM, generator=generator)
    values = torch.randn(H_KV, n, DIM, generator=generator)
    queries = torch.randn(H_KV * GROUP, w, DIM, generator=generator)
    return keys, values, queries


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decode_choice_equals_prefill_choice_and_the_hand_computed_one(seed):
    """Over the same keys and queries, snapkv's prefill choice and the wrapper's choice at a decode step are the
    same tokens, and both are SnapKV's by the definition (computed by hand above)."""
    n, w, kernel, kept, scaling = 40, 6, 3, 16, 0.35
    keys, values, queries = random_layer(n, w, seed)
    expected = hand_snapkv(keys, queries, scaling, w, kernel, kept)

    observation = Observation(torch.zeros(n, dtype=torch.long), [keys], [values], scaling, torch.zeros(1), [queries])
    prefill_prefix = get_method(f"snapkv:window={w}:kernel={kernel}").compress(observation, kept / n)[0]
    for head in range(H_KV):
        assert torch.equal(prefill_prefix.keys[head], keys[head, expected[head]])

    # The same keys in a cache: the first 30 compressed earlier, the last 10 fed while decoding; the window's queries
    # are the buffer's (the oldest w − 1) and the newest query, which arrives through the recorder.
    method = get_method(f"decoding:base=snapkv:base_options=window={w}/kernel={kernel}:interval=4")
    wrapped = method.compress(observation, 1.0 - 1e-9)  # any budget: the state is rebuilt by hand below
    state = wrapped.decode_state
    # a ceiling of T = kept + interval − 1 tokens: the cache (40 > T) is compressed to T − interval + 1 = kept
    state.target, state.interval, state.scaling = kept + 3, 4, scaling
    state.queries = [torch.zeros(H_KV * GROUP, w, DIM)]
    state.queries[0][:, 1:] = queries[:, :-1]
    state.filled = w - 1
    cache = KVBenchCache(1, [TokenPrefix(keys[:, :30], values[:, :30])], 30, method_state=state)
    cache.layers[0].update(keys[None, :, 30:], values[None, :, 30:])
    state.log = QueryLog([0])
    cache.recorder = state.log
    state.log.observe(0, queries[None, :, -1:], keys[None], scaling)
    method.on_decode_step(cache, 0)
    assert state.compressions == 1 and cache.layers[0].tail_length == 0
    for head in range(H_KV):
        assert torch.equal(cache.layers[0].prefix.keys[head], keys[head, expected[head]])
        assert torch.equal(cache.layers[0].prefix.values[head], values[head, expected[head]])


def test_knorm_decode_choice_is_the_lowest_key_norms():
    n, kept = 30, 9
    keys, values, _ = random_layer(n, 1, 5)
    method = get_method("decoding:base=knorm:interval=1")
    observation = Observation(torch.zeros(n, dtype=torch.long), [keys], [values], 1.0, torch.zeros(1))
    prefixes = method.compress(observation, 0.5)
    state = prefixes.decode_state
    state.target = kept
    cache = KVBenchCache(1, [TokenPrefix(keys[:, :20], values[:, :20])], 20, method_state=state)
    cache.layers[0].update(keys[None, :, 20:], values[None, :, 20:])
    method.on_decode_step(cache, 0)
    for head in range(H_KV):
        norms = [float(keys[head, j].norm()) for j in range(n)]
        expected = sorted(sorted(range(n), key=lambda j: norms[j])[:kept])
        assert torch.equal(cache.layers[0].prefix.keys[head], keys[head, expected])


@pytest.fixture(scope="module")
def loaded():
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama-gqa", layers=2, vocab=VOCAB)
    return LoadedModel("tiny", "memory:tiny", model, tokenizer, torch.device("cpu"), torch.float32)


def per_token_bytes(model) -> int:
    """Keys and values of one token per KV head, every layer, fp32: by the model's shapes."""
    config = model.config
    return (
        config.num_hidden_layers
        * 2
        * config.num_key_value_heads
        * (config.hidden_size // config.num_attention_heads)
        * 4
    )


@pytest.mark.parametrize(
    "spec", ["decoding:base=snapkv:base_options=window=8/kernel=3:interval=16", "decoding:base=tova:interval=7"]
)
@pytest.mark.parametrize("budget", [TokenBudget(64), 0.3])
def test_the_budget_holds_at_every_step_of_a_long_generation(loaded, spec, budget):
    """300 generated tokens after a 150-token context: after every step everything the cache holds (compressed
    part, raw tail and decode state) stays within the budget (T tokens, or b of the context, per head's worth of
    bytes); the cache is compressed every `interval` tokens once full."""
    context, question = random_ids(150, seed=3), random_ids(4, seed=4)
    method = get_method(spec)
    per_token = per_token_bytes(loaded.model)
    ceiling = (budget.tokens if isinstance(budget, TokenBudget) else budget * len(context)) * per_token
    interval = method.config.interval
    compressed = compress_context(loaded, None, method, budget, context)
    cache = compressed.cache
    assert cache.kv_bytes() <= ceiling
    steps = []

    def check(cache, step):
        method.on_decode_step(cache, step)
        assert cache.kv_bytes() <= ceiling
        assert cache.held_bytes() <= ceiling
        steps.append(step)

    greedy_decode(loaded.model, cache, question, 300, [], step_hook=check, start_hook=method.on_decode_start)
    assert len(steps) == 299
    assert cache.method_state.compressions >= 300 // interval - 1


def test_a_budget_never_reached_equals_the_base(loaded):
    """Where the cache never reaches the budget the wrapper answers as its base (and as full): the same tokens.
    Where it does, the wrapper evicts the answer's tokens too and holds no more than the budget at any step,
    where its base, compressing the context only, holds the growing answer on top."""
    context, question = random_ids(120, seed=5), random_ids(4, seed=6)
    observed = TimedObservation(prefill(loaded.model, context, ObservationNeeds(window=64)), 0.0)

    def answer(spec, budget):
        return run_cell(loaded, observed, get_method(spec), budget, question, 60, keep_logits=True, context_ids=context)

    full = answer("full", 1.0)
    never = answer("decoding:base=snapkv", TokenBudget(4096))
    assert never.token_ids == full.token_ids and len(full.token_ids) == 60
    assert answer("snapkv", TokenBudget(4096)).token_ids == full.token_ids
    base = answer("knorm", 0.5)
    compressing = answer("decoding:base=knorm:interval=8", 0.5)
    ceiling = 0.5 * len(context) * per_token_bytes(loaded.model)
    assert compressing.kv_bytes_peak <= ceiling < base.kv_bytes_peak  # the answer's tokens are evicted too


@pytest.mark.parametrize("length, kept", [(300, 128), (100, 100)])
def test_snapkv_at_a_token_budget_keeps_that_many_tokens_per_head(loaded, length, kept):
    context = random_ids(length, seed=7)
    compressed = compress_context(loaded, None, get_method("snapkv"), TokenBudget(128), context)
    for layer in compressed.cache.layers:
        assert layer.prefix.head_lengths() == [kept] * 2
    assert compressed.cache.kv_bytes() == kept * per_token_bytes(loaded.model)


@pytest.mark.parametrize("tokens", [1, 7, 128, 333, 999])
@pytest.mark.parametrize("length", [1000, 1023, 4097])
def test_token_fraction_floors_to_the_tokens(tokens, length):
    assert int(length * fraction_of(tokens, length)) == tokens


def test_token_budgets_parse_and_stay_apart_from_fractions():
    budgets = parse_budgets("0.25,256t,1t,1", tokens=True)
    assert [str(b) if isinstance(b, TokenBudget) else b for b in budgets] == [0.25, "256t", "1t", 1.0]
    with pytest.raises(KVBenchError):
        parse_budgets("256t")  # where only fractions are meant (lm-eval)
    for bad in ["0t", "t", "2.5t", "-3t"]:
        with pytest.raises(BudgetError):
            parse_budget(bad)
    row = {"task": "x", "length": 1, "sample_id": 0, "metric": "m", "identity_hash": "h"}
    assert cell_key({**row, "budget": 1.0}) != cell_key({**row, "budget": 1.0, "budget_tokens": 1})


@pytest.mark.parametrize("base", ["kivi", "autoencoder", "h2o", "expected_attention", "nonsense"])
def test_bases_that_cannot_score_while_decoding_are_refused_in_one_line(base):
    with pytest.raises(KVBenchError) as refusal:
        get_method(f"decoding:base={base}")
    assert "\n" not in str(refusal.value) and base in str(refusal.value)


def test_a_budget_below_the_window_of_queries_is_refused_naming_the_lowest(loaded):
    context = random_ids(200, seed=8)
    with pytest.raises(BudgetError, match="lowest reachable budget is 65t"):
        compress_context(loaded, None, get_method("decoding"), TokenBudget(32), context)


@pytest.mark.parametrize("budget, step", [(0.1, 0.001), (TokenBudget(20), 1)])
def test_an_interval_longer_than_the_budget_is_refused_naming_the_lowest(loaded, budget, step):
    """knorm keeps no decode state: the lowest reachable budget at interval 64 is the one keeping 64 tokens per
    head; it runs there, and one step below it is refused."""
    context = random_ids(200, seed=9)
    method = get_method("decoding:base=knorm:interval=64")
    with pytest.raises(BudgetError, match="lowest reachable budget at this interval is") as refused:
        compress_context(loaded, None, method, budget, context)
    text = str(refused.value).split("at this interval is ")[1].split(" ")[0]
    lowest = parse_budget(text)
    assert lowest == (TokenBudget(64) if isinstance(budget, TokenBudget) else 0.32)
    compress_context(loaded, None, method, lowest, context)
    below = TokenBudget(63) if isinstance(budget, TokenBudget) else round(lowest - step, 3)
    with pytest.raises(BudgetError):
        compress_context(loaded, None, method, below, context)


def test_a_decode_batch_answers_as_each_row_alone(loaded):
    """The wrapper's compressions happen on each row's own cache in a decode batch: the same tokens as alone."""
    from kvbench.harness.engine.pipeline import iter_context_cells

    context, question = random_ids(100, seed=9), random_ids(4, seed=10)
    cells = [(get_method("decoding:base=snapkv:base_options=window=8:interval=8"), TokenBudget(40))]
    cells += [(get_method("decoding:base=knorm:interval=5"), 0.3), (get_method("full"), 1.0)]

    def answers(batch_size):
        outcomes = iter_context_cells(loaded, context, question, cells, 50, batch_size=batch_size)
        return [(result.token_ids, result.kv_bytes_peak, result.kv_bytes_final) for _, _, result in outcomes]

    alone, together = answers(1), answers(3)
    assert together == alone and all(len(tokens) == 50 for tokens, _, _ in alone)


def test_sweep_rows_record_token_budgets_and_resume(chat_model_dir, tmp_path, monkeypatch, capsys):
    """A sweep at 0.25 and 128t: token rows say budget 128 with budget_tokens, and an achieved ratio of 128 tokens
    over the context; fractional rows carry no budget_tokens; every row has its generation measurements; a rerun
    finds every cell done."""
    import json

    from kvbench.harness.cli.commands import main

    monkeypatch.setenv("KVBENCH_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run"
    args = ["run", "--model", chat_model_dir, "--methods", "snapkv,decoding:base=knorm:interval=8"]
    args += ["--budgets", "0.25,128t", "--tasks", "passkey", "--lengths", "600", "--samples", "1"]
    args += ["--out", str(out), "--no-progress"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((r["method_label"], r["budget"], r.get("budget_tokens")) for r in rows) == [
        ("decoding:base=knorm:interval=8", 0.25, None),
        ("decoding:base=knorm:interval=8", 128.0, 128),
        ("snapkv", 0.25, None),
        ("snapkv", 128.0, 128),
    ]
    for row in rows:
        assert row["kv_bytes_final"] <= row["kv_bytes_peak"] and row["kv_trace"][0][0] == 0
        assert row["decode_tokens_per_s"] == pytest.approx(row["new_tokens"] / row["decode_s"], rel=0.01)
        if row["method"] == "snapkv" and row.get("budget_tokens"):
            assert row["kv_ratio"] == pytest.approx(128 / row["context_tokens"], abs=1e-6)
    capsys.readouterr()
    assert main(args) == 0
    said = capsys.readouterr()
    assert "4 finished cells found" in said.out + said.err
    assert len((out / "results.jsonl").read_text().splitlines()) == 4


def test_the_label_names_the_base_even_when_it_is_the_default():
    """A report line must say which scorer the wrapper runs: `decoding:interval=32` is snapkv's, and says so; the
    label parses back to the same method."""
    from kvbench.methods.base import get_method

    assert get_method("decoding:interval=32").label == "decoding:base=snapkv:interval=32"
    assert get_method("decoding").label == "decoding:base=snapkv"
    assert get_method("decoding:base=tova:interval=32").label == "decoding:base=tova:interval=32"
    spec = "decoding:base_options=window=16:interval=32"
    assert get_method(spec).label == "decoding:base=snapkv:base_options=window=16:interval=32"
    assert get_method(get_method(spec).label).config == get_method(spec).config
