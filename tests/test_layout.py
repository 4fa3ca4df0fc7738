"""The layout: every sub-package is installed, dependencies point one way (ARCHITECTURE.md), code written against
the flat layout still runs, and what was stored before the move (result stores, checkpoints, stored contexts)
still reads."""

from __future__ import annotations

import ast
import importlib
import shlex
import shutil
import sys
import tomllib
import warnings
from pathlib import Path

import pytest
import torch

import kvbench.methods as methods
from kvbench.harness.moved import MOVED

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("harness", "methods", "tasks", "reports")
RESULTS = REPO / "results"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(("kvbench", *parts))


def _sources() -> list[Path]:
    return sorted(path for root in ROOTS for path in (REPO / root).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    """Every kvbench module `path` imports, at its top or inside a function (both count: the direction is
    about what the code may reach, not when)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.startswith("kvbench.")}


def test_every_package_is_installed_and_every_folder_is_a_package():
    declared = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {path.parent for path in _sources()}
    assert all((folder / "__init__.py").exists() for folder in folders), "a folder of sources without __init__.py"
    assert declared == {_module_name(folder / "__init__.py") for folder in folders}


# (who, what it must never import): ARCHITECTURE.md's directions.
FORBIDDEN = [
    (
        "kvbench.methods",
        ("kvbench.harness.runner", "kvbench.harness.cli", "kvbench.harness.lm_eval", "kvbench.reports"),
    ),
    ("kvbench.methods", ("kvbench.harness.artifacts.calibration",)),
    ("kvbench.tasks", ("kvbench.harness.", "kvbench.methods", "kvbench.reports")),
    ("kvbench.harness.cache", ("kvbench.harness.engine", "kvbench.harness.models", "kvbench.harness.runner")),
    ("kvbench.harness.cache", ("kvbench.harness.artifacts", "kvbench.harness.cli", "kvbench.harness.lm_eval")),
    ("kvbench.harness.models", ("kvbench.harness.engine", "kvbench.harness.runner", "kvbench.harness.cli")),
    ("kvbench.harness.engine", ("kvbench.harness.runner", "kvbench.harness.cli", "kvbench.harness.lm_eval")),
    ("kvbench.harness.artifacts", ("kvbench.harness.engine", "kvbench.harness.runner", "kvbench.harness.cli")),
    ("kvbench.harness.runner", ("kvbench.harness.cli", "kvbench.harness.lm_eval", "kvbench.reports")),
    ("kvbench.harness.lm_eval", ("kvbench.harness.cli",)),
]
# tasks may raise kvbench's one-line error; reports read only the store.
ALLOWED = {"kvbench.tasks": {"kvbench.harness.errors", "kvbench.harness.errors.KVBenchError"}}


def test_dependencies_point_one_way():
    broken = []
    for path in _sources():
        module = _module_name(path)
        imported = _imports(path)
        for who, never in FORBIDDEN:
            if module == who or module.startswith(who + "."):
                allowed = ALLOWED.get(who, set())
                broken += [(module, name) for name in imported if name.startswith(never) and name not in allowed]
        if module.startswith("kvbench.reports"):
            outside = {name for name in imported if not name.startswith(("kvbench.reports", "kvbench.tasks"))}
            broken += [(module, name) for name in outside if not name.startswith("kvbench.harness.runner.store")]
    assert broken == []


def test_the_direction_check_sees_a_violation(tmp_path):
    """The check above is only as good as `_imports`: it finds imports inside functions too."""
    source = tmp_path / "x.py"
    source.write_text("def f():\n    from kvbench.harness.runner.sweep import run_sweep\n")
    assert "kvbench.harness.runner.sweep" in _imports(source)


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_module_path_is_the_module_at_its_new_place(old):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {MOVED[old]}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(MOVED[old])
    assert module.__spec__.name == MOVED[old]  # the module itself is unchanged by its old name


def test_names_of_the_old_modules_that_became_packages_still_resolve():
    from kvbench.harness.cache.kv_cache import KVBenchCache
    from kvbench.harness.cli.commands import main
    from kvbench.harness.models.loading import load_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from kvbench.harness.cache import KVBenchCache as old_cache
        from kvbench.harness.cli import main as old_main
        from kvbench.harness.models import load_model as old_load

    assert (old_cache, old_main, old_load) == (KVBenchCache, main, load_model)
    assert {str(w.message).split(" moved")[0] for w in caught} == {
        "kvbench.harness.cache.KVBenchCache",
        "kvbench.harness.cli.main",
        "kvbench.harness.models.load_model",
    }
    with pytest.raises(AttributeError):
        import kvbench.harness.cache as cache_package

        cache_package.no_such_name  # noqa: B018


# The README's example plug-in as the flat layout had it, verbatim but for its name.
FLAT_LAYOUT_EXAMPLE = '''
from dataclasses import dataclass

from kvbench.harness.errors import BudgetError
from kvbench.harness.prefill import Observation
from kvbench.harness.prefix import TokenPrefix
from kvbench.methods import Method, register


@dataclass(frozen=True)
class FirstTokensConfig:
    """No options: the budget alone sets how many tokens each KV head keeps."""


@register
class FirstTokens(Method):
    name = "first_tokens_flat_layout"
    family = "token eviction"
    description = "Keeps the first int(b*N) context tokens of every KV head"
    Config = FirstTokensConfig

    def _compress(self, observation: Observation, budget: float) -> list[TokenPrefix]:
        n_kept = int(observation.context_length * budget)
        if n_kept < 1:
            raise BudgetError(f"first_tokens at budget {budget:g} keeps no token; raise the budget")
        return [TokenPrefix(k[:, :n_kept], v[:, :n_kept]) for k, v in zip(observation.keys, observation.values)]
'''


@pytest.fixture
def registry_restored():
    methods.load_all()  # what is registered after the test is what load_all registers: its modules import once
    before = dict(methods.REGISTRY)
    yield
    methods.REGISTRY.clear()
    methods.REGISTRY.update(before)


def test_a_plugin_written_against_the_flat_layout_still_compresses(registry_restored):
    from tiny_models import tiny_model

    from kvbench.harness.engine.prefill import prefill

    namespace: dict = {"__name__": "flat_layout_plugin"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        exec(compile(FLAT_LAYOUT_EXAMPLE, "flat_layout_plugin.py", "exec"), namespace)
    method = methods.get_method("first_tokens_flat_layout")
    model = tiny_model("llama-gqa")
    observation = prefill(model, torch.arange(3, 43).tolist(), methods.ObservationNeeds())
    kept = method.compress(observation, 0.25)
    assert len(kept) == len(observation.keys)
    assert torch.equal(kept[0].keys, observation.keys[0][:, :10])


def test_stored_contexts_keep_the_class_names_of_their_format():
    """The names a stored context gives its classes are the format's (the flat layout's module paths): files
    written before the move name them so, and files written now must too, or the older ones stop loading."""
    from kvbench.harness.cache.prefix import TokenPrefix
    from kvbench.harness.cache.quantized_prefix import QuantizedTensor
    from kvbench.harness.engine import stored_context

    prefix = TokenPrefix(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))
    assert stored_context._encode(prefix, 0)["class"] == "kvbench.harness.prefix:TokenPrefix"
    codes = QuantizedTensor.__new__(QuantizedTensor)
    assert stored_context._encode(codes, 0)["class"] == "kvbench.harness.quantized_prefix:QuantizedTensor"
    assert isinstance(stored_context._decode(stored_context._encode(prefix, 0), None), TokenPrefix)


def _stores() -> list[Path]:
    return sorted(path.parent for path in RESULTS.rglob("run.json"))


@pytest.mark.parametrize("store", _stores(), ids=lambda path: path.name)
def test_every_committed_store_reads_and_summarises(store):
    from kvbench.reports import load_run
    from kvbench.reports.tables import summary

    run = load_run(store)
    assert len(run.rows) > 0 and len(summary(run.rows)) > 0


def test_a_committed_store_renders_its_whole_report(tmp_path):
    from kvbench.reports import render_report

    copy = shutil.copytree(RESULTS / "smollm2-135m" / "zack-perplexity-2k", tmp_path / "store")
    markdown, page = render_report(copy)
    assert "perplexity" in markdown.read_text() and page.stat().st_size > 0


def test_a_committed_store_resumes_with_nothing_to_compute_and_its_checkpoints_load(tmp_path, monkeypatch):
    """policy-4k (full, snapkv, adakv, adaptive_policy over snapkv and over expected_attention, h2o, tova: methods
    whose algorithms are unchanged since it was computed) resumes with nothing to compute, its two committed
    adaptive_policy checkpoints loaded as its rows name them; the four committed lightweight checkpoints load too
    (the stores computed with lightweight version 1 rightly recompute their lightweight cells today)."""
    import json

    from kvbench.harness.artifacts.calibration import ensure_calibrated
    from kvbench.harness.cli.commands import main
    from kvbench.harness.models.loading import load_model

    store = RESULTS / "smollm2-135m" / "policy-4k"
    copy = shutil.copytree(store, tmp_path / "store")
    command = shlex.split(json.loads((store / "run.json").read_text())["invocations"][-1]["command"])
    argv = command[1:]
    argv[argv.index("--out") + 1] = str(copy)
    monkeypatch.chdir(REPO)  # the rows name their checkpoints by repo-relative paths
    assert main([*argv, "--workers", "1", "--no-report", "--no-progress"]) == 0
    assert (copy / "results.jsonl").read_bytes() == (store / "results.jsonl").read_bytes()

    loaded = load_model("smollm2-135m", "cpu", "float32")
    ablation = json.loads((RESULTS / "smollm2-135m" / "lightweight-ablation-1k" / "run.json").read_text())
    specs = [s for s in ablation["methods"] if s.startswith("lightweight")]
    assert len(specs) == 4
    for spec in specs:
        method = methods.get_method(spec)
        ensure_calibrated(loaded, method)
        assert method.artifact_fingerprint()
