"""What a row says produced it is what produced it: identities, method options, refusals, memory fields."""

import json

import pytest
import torch
from conftest import build_tasks_tokenizer
from tiny_models import random_ids, tiny_model

from kvbench.harness.cache.prefix import stored_bytes
from kvbench.harness.cli.commands import main
from kvbench.harness.engine.pipeline import run_cell
from kvbench.harness.errors import KVBenchError
from kvbench.harness.models.loading import LoadedModel
from kvbench.methods import get_method

IDENTITY_FIELDS = {
    "model", "model_fingerprint", "dtype", "device", "attention_backend", "task_generator_version",
    "seed", "query_aware", "chat_template", "method", "method_version", "method_config", "artifact",
}  # fmt: skip


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBENCH_CACHE_DIR", str(tmp_path / "cache"))


def run(chat_model_dir, out, methods, budgets="0.5", *extra):
    return main(
        ["run", "--model", chat_model_dir, "--methods", methods, "--budgets", budgets, "--tasks", "niah_single_1",
         "--lengths", "512", "--samples", "2", "--out", str(out), "--no-progress", "--no-report", *extra]
    )  # fmt: skip


def rows(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def strip_identity_of_first_row(out):
    """Make the store's first row stale: recorded without an identity."""
    stale = rows(out)
    stale[0] = {k: v for k, v in stale[0].items() if k not in ("identity", "identity_hash")}
    (out / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in stale))


def test_every_row_carries_its_identity_and_provenance(chat_model_dir, tmp_path):
    assert run(chat_model_dir, tmp_path / "run", "full,snapkv:window=16") == 0
    found = rows(tmp_path / "run")
    assert len(found) == 4
    for row in found:
        assert set(row["identity"]) == IDENTITY_FIELDS
        assert row["identity"]["model_fingerprint"].startswith("sha256:")
        assert row["identity"]["dtype"] == "float32" and row["identity"]["device"] == "cpu"
        assert row["identity_hash"] and row["git_commit"] and row["kvbench_version"]
        assert row["model_source"] == chat_model_dir
        assert row["method_config"] == row["identity"]["method_config"]
    snap = next(row for row in found if row["method"] == "snapkv")
    assert snap["method_label"] == "snapkv:window=16"
    assert snap["method_config"] == {"window": 16, "kernel": 5, "pooling": "avg"}


def test_bf16_into_an_fp32_store_is_refused_and_force_replaces_it(chat_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(chat_model_dir, out, "full,snapkv", "0.5", "--dtype", "float32") == 0
    capsys.readouterr()
    assert run(chat_model_dir, out, "full,snapkv", "0.5", "--dtype", "bfloat16") == 2
    error = capsys.readouterr().err.strip()
    assert "dtype 'float32' (now 'bfloat16')" in error and "\n" not in error
    assert {row["identity"]["dtype"] for row in rows(out)} == {"float32"}
    assert run(chat_model_dir, out, "full,snapkv", "0.5", "--dtype", "bfloat16", "--force") == 0
    assert {row["identity"]["dtype"] for row in rows(out)} == {"bfloat16"}
    meta = json.loads((out / "run.json").read_text())
    assert meta["dtype"] == "bfloat16" and meta["identity"]["dtype"] == "bfloat16"
    commands = [entry["command"] for entry in meta["invocations"]]
    assert len(commands) == 2 and "float32" in commands[0] and "bfloat16" in commands[1]
    assert meta["invocations"][0]["rows_replaced"] is True


def test_two_configurations_are_two_cells_and_a_new_option_computes_only_its_cells(chat_model_dir, tmp_path):
    out = tmp_path / "run"
    assert run(chat_model_dir, out, "snapkv,snapkv:window=16:kernel=3") == 0
    first = rows(out)
    assert sorted({row["method_label"] for row in first}) == ["snapkv", "snapkv:window=16:kernel=3"]
    assert len(first) == 4
    assert run(chat_model_dir, out, "snapkv,snapkv:window=16:kernel=3,snapkv:window=8") == 0
    second = rows(out)
    assert second[:4] == first
    assert [row["method_label"] for row in second[4:]] == ["snapkv:window=8"] * 2
    # The same configuration written another way (defaults spelt out) is the same cell: nothing to compute.
    assert run(chat_model_dir, out, "snapkv:window=64:kernel=5,snapkv:kernel=3:window=16") == 0
    assert rows(out) == second


def test_a_row_of_another_configuration_under_the_same_label_is_refused(chat_model_dir, tmp_path, capsys):
    """A store never mixes identities: a row whose identity differs from what its label means now (an older
    default, another artifact, or no identity at all) is refused, or recomputed with --force."""
    out = tmp_path / "run"
    assert run(chat_model_dir, out, "snapkv") == 0
    strip_identity_of_first_row(out)
    capsys.readouterr()
    assert run(chat_model_dir, out, "snapkv") == 2
    assert "1 rows of snapkv" in capsys.readouterr().err
    assert run(chat_model_dir, out, "snapkv", "0.5", "--force") == 0
    assert len(rows(out)) == 2 and all(row.get("identity_hash") for row in rows(out))


def test_a_stale_row_is_refused_before_another_method_calibrates(chat_model_dir, tmp_path, capsys):
    """Methods whose identity is known without calibrating are checked against the store first: a stale snapkv row
    is refused before razor (not yet calibrated for this model) spends its calibration."""
    out = tmp_path / "run"
    assert run(chat_model_dir, out, "snapkv") == 0
    strip_identity_of_first_row(out)
    capsys.readouterr()
    assert run(chat_model_dir, out, "snapkv,razor") == 2
    err = capsys.readouterr().err
    assert "1 rows of snapkv" in err and "calibrating razor" not in err
    assert not list((tmp_path / "cache").glob("calibration/razor-*"))
    assert run(chat_model_dir, out, "snapkv,razor", "0.5", "--force") == 0
    assert "calibrating razor" in capsys.readouterr().err
    assert {row["method"] for row in rows(out)} == {"snapkv", "razor"}


def test_bad_method_options_are_one_line(chat_model_dir, tmp_path, capsys):
    for spec, expected in [
        ("snapkv:win=3", "snapkv has no option 'win'; its options (defaults): window=64, kernel=5, pooling=avg"),
        ("snapkv:window=x", "snapkv: option window=x is not an integer; window must be an integer >= 1"),
        ("snapkv:pooling=median", "snapkv: option pooling=median is out of range; pooling must be one of avg, max"),
        ("snapkv:window", "is not option=value"),
    ]:
        assert run(chat_model_dir, tmp_path / "run", spec) == 2
        error = capsys.readouterr().err.strip()
        assert expected in error and "\n" not in error
        assert not (tmp_path / "run").exists()  # refused after the argument checks created it: removed again


def test_unreachable_budgets_of_an_own_prefill_method_are_refused_rows(chat_model_dir, tmp_path):
    out = tmp_path / "run"
    assert run(chat_model_dir, out, "snapkv,attention_clustering", "0.001,0.5") == 0
    found = rows(out)
    cells = {(row["method"], row["budget"]) for row in found}
    assert cells == {("snapkv", 0.001), ("snapkv", 0.5), ("attention_clustering", 0.001), ("attention_clustering", 0.5)}
    refused = {(row["method"], row["budget"]) for row in found if row["score"] is None}
    assert ("attention_clustering", 0.001) in refused
    assert all(row["error"] for row in found if row["score"] is None)
    scored = [row for row in found if row["budget"] == 0.5]
    assert len(scored) == 4 and all(row["score"] is not None for row in scored)


def test_method_label_lists_only_options_that_differ():
    assert get_method("snapkv:window=64").label == "snapkv"
    assert get_method("attention_clustering:pruning_interval=256:cluster=false").label == (
        "attention_clustering:pruning_interval=256:cluster=false"
    )
    with pytest.raises(KVBenchError, match="sets option window twice"):
        get_method("snapkv:window=3:window=4")


@pytest.fixture(scope="module")
def tiny_loaded():
    tokenizer = build_tasks_tokenizer(chat_template=False)
    model = tiny_model("llama-gqa", layers=2, vocab=len(tokenizer))
    return LoadedModel("tiny", "memory:tiny", model, tokenizer, torch.device("cpu"), torch.float32)


def test_kv_bytes_peak_follows_the_cache_over_the_decode(tiny_loaded):
    """Peak = the most the cache held (prefix, method state and tail), read after each step. For a method that
    keeps its prefix, the peak is kv_bytes plus the tail of question and answer tokens, counted by hand."""
    context, question = random_ids(200, seed=3), random_ids(6, seed=4)
    config = tiny_loaded.model.config
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * (config.hidden_size // 4) * 4
    result = run_cell(tiny_loaded, None, get_method("snapkv"), 0.5, question, 10, context_ids=context)
    assert per_token == 2 * 2 * config.num_key_value_heads * config.head_dim * 4
    # The last generated token is never fed back, so the tail holds question + new_tokens - 1 tokens at the end.
    assert result.kv_bytes_peak == result.kv_bytes + per_token * (len(question) + result.new_tokens - 1)


def test_kv_bytes_peak_of_a_method_that_prunes_while_decoding(tiny_loaded):
    """attention_clustering holds its K centroids plus the raw tail until the tail passes B - K entries, then
    prunes and merges at the next multiple of P: the peak lies above kv_bytes, but below what the cache would hold
    had every answer token stayed (the answer here is long enough for prunes to fire)."""
    context, question = random_ids(300, seed=5), random_ids(4, seed=6)
    method = get_method("attention_clustering", pruning_interval=64, lookback_window=32)
    result = run_cell(tiny_loaded, None, method, 0.25, question, 600, context_ids=context)
    assert result.new_tokens == 600
    config = tiny_loaded.model.config
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4
    never_pruned = result.kv_bytes + per_token * (len(question) + result.new_tokens - 1)
    assert result.kv_bytes < result.kv_bytes_peak < 0.75 * never_pruned


def test_stored_bytes_counts_a_shared_tensor_once_and_survives_cycles():
    tensor = torch.zeros(10, dtype=torch.float32)

    class Holder:
        pass

    holder = Holder()
    holder.a, holder.b, holder.self = tensor, tensor[2:], holder
    assert stored_bytes([holder, {"again": tensor}]) == 40


def test_an_emptied_tail_holds_no_storage():
    """A decode-time method absorbs the tail into its prefix; what the tail held must then be freed and uncounted."""
    from kvbench.harness.cache.kv_cache import KVBenchCache

    cache = KVBenchCache(1)
    cache.layers[0].update(torch.ones(1, 2, 5, 4), torch.ones(1, 2, 5, 4))
    assert cache.held_bytes() == 2 * 2 * 5 * 4 * 4
    cache.layers[0].crop(-2)
    assert cache.held_bytes() == 2 * 2 * 3 * 4 * 4
    cache.reset_tail()
    assert cache.held_bytes() == 0 and cache.get_seq_length() == 0
