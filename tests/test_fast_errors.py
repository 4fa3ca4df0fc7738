"""Argument errors come before any slow work: no torch import, no model load, only the model's config."""

import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvbench.harness.cli import fast_checks
from kvbench.harness.cli.commands import main
from kvbench.harness.errors import KVBenchError
from kvbench.harness.method_spec import allowed_values
from kvbench.harness.models.loading import gguf_context_length, model_max_length

RUN = ["run", "--methods", "full", "--budgets", "0.5", "--tasks", "niah_single_1", "--lengths", "64"]
LM_EVAL = ["lm-eval", "--methods", "full", "--budgets", "0.5", "--tasks", "arc_easy"]
GENERATE = ["generate", "--method", "full", "--budget", "0.5", "--prompt", "some context"]


def _set(argv, flag, value):
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


def bad_inputs(model_dir: str, scratch: Path) -> list[tuple[list[str], str]]:
    """(argv, text the one line must hold): the benchmark's cases (benchmarks/errors.py), on a local model."""
    blocker = scratch / "a-file"
    blocker.write_text("")
    run = _set(RUN, "--budgets", "0.5") + ["--model", model_dir, "--out", str(scratch / "run")]
    lm_eval = LM_EVAL + ["--model", model_dir, "--out", str(scratch / "lm")]
    return [
        (_set(run, "--budgets", "1.5"), "budget 1.5 is outside (0, 1]"),
        (_set(run, "--tasks", "no_such_task"), "unknown task 'no_such_task'"),
        (run + ["--samples", "0"], "--samples 0 must be at least 1"),
        (_set(run, "--lengths", "4096"), f"length 4096 exceeds {model_dir}'s maximum of 2048 tokens"),
        (_set(run, "--methods", "no_such_method"), "unknown method 'no_such_method'"),
        (_set(run, "--methods", "snapkv:windw=8"), "snapkv has no option 'windw'"),
        (_set(run, "--methods", "snapkv:window=abc"), "snapkv: option window=abc is not an integer; window must be"),
        (_set(run, "--methods", "snapkv:window=-3"), "snapkv: option window=-3 is out of range; window must be an"),
        (_set(run, "--methods", "expected_attention:epsilon=nan"), "option epsilon=nan is out of range"),
        (_set(run, "--methods", "adakv:base_options=kernel=4"), "adakv: base snapkv: option kernel=4 is out of range"),
        (run + ["--out", str(blocker / "run")], "cannot write to output directory"),
        (run + ["--dtype", "int8"], "unknown dtype 'int8'"),
        (_set(GENERATE, "--prompt", "   "), "the prompt is empty"),
        (GENERATE + ["--model", str(scratch / "no-such-model")], "does not exist"),
        (_set(lm_eval, "--tasks", "no_such_lm_eval_task"), "unknown lm-eval task 'no_such_lm_eval_task'"),
        (lm_eval + ["--device", "tpu"], "unknown device 'tpu'"),
        (lm_eval + ["--limit", "0"], "--limit 0 must be at least 1"),
        (["report", str(scratch / "no-such-run")], "no run.json in"),
        (["report", str(scratch / "no-such-run"), "--length-bins", "0,8k,4k"], "edges must increase (4096 follows"),
        (run + ["--length-bins", "0,4k,x"], "--length-bins edge 'x' is not a token count"),
        (run + ["--length-bins", "4k"], "gives 1 edge; give at least two"),
        (run + ["--length-bins", "0,inf,8k"], "only the last edge may be inf"),
        (["compare", str(scratch / "no-such-run"), "--pair", "a", "b", "--length-bins", "0"], "gives 1 edge"),
    ] + ([(run + ["--device", "cuda"], "--device cuda was asked for but")] if fast_checks.cuda_absence() else [])


@pytest.fixture(scope="module")
def config_only_model(tmp_path_factory):
    """A model directory with a config and no weights: enough for every argument check."""
    path = tmp_path_factory.mktemp("config-only")
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 2048}))
    return str(path)


# In the child, torch, transformers and the method modules cannot be imported at all: an argument check that
# reached for them would crash with an ImportError traceback instead of the one line.
BLOCKED = "import sys\nfor name in ('torch', 'transformers', 'kvbench.methods.base'):\n    sys.modules[name] = None\n"


def test_every_bad_input_is_one_line_without_torch_or_a_model(config_only_model, tmp_path):
    cases = bad_inputs(config_only_model, tmp_path)
    script = BLOCKED + (
        "import json\nfrom kvbench.harness.cli.commands import main\n"
        f"for argv in json.loads({json.dumps(json.dumps([argv for argv, _ in cases]))}):\n"
        "    print('exit', main(argv), file=sys.stderr, flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 2 * len(cases)
    for (argv, expected), line, code in zip(cases, lines[::2], lines[1::2]):
        assert line.startswith("kvbench: error: ") and expected in line, (argv, line)
        assert code == "exit 2", argv


def test_a_bad_budget_is_reported_without_loading_the_model(monkeypatch, capsys, tiny_model_dir, tmp_path):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    import kvbench.harness.runner.sweep  # imported first: importing it after the patch would bind the patched loader

    monkeypatch.setattr("kvbench.harness.models.loading.load_model", no_load)
    monkeypatch.setattr(kvbench.harness.runner.sweep, "load_model", no_load)
    out = ["--model", tiny_model_dir, "--out", str(tmp_path / "run")]
    for argv in (
        _set(RUN, "--budgets", "2"),
        _set(RUN, "--lengths", "5000"),
        _set(RUN, "--tasks", "nope"),
        _set(RUN, "--methods", "snapkv:window=-3"),
        _set(RUN, "--methods", "dynamickv:r_max=nan"),
        _set(RUN, "--methods", "snapkv:window=abc"),
    ):
        assert main(argv + out) == 2
        err = capsys.readouterr().err
        assert err.startswith("kvbench: error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()  # refused before --out was created, too


def test_an_out_of_range_option_needs_no_torch_and_no_sample(tmp_path):
    """The child cannot import torch or a method module: the refusal comes from the source index alone."""
    argv = [*_set(RUN, "--methods", "full,zack:r_min=-3"), "--out", str(tmp_path / "run")]
    script = BLOCKED + f"from kvbench.harness.cli.commands import main\nsys.exit(main({argv!r}))\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr == ("kvbench: error: zack: option r_min=-3 is out of range; r_min must be an integer >= 1\n")


def test_the_source_index_matches_the_registry():
    from kvbench.methods import REGISTRY, get_method, load_all

    load_all()
    index = fast_checks.method_index()
    assert set(index) == set(REGISTRY)
    for name, cls in REGISTRY.items():
        if index[name].options is None:  # a Config from another module: option names are left to the registry
            continue
        fields = dataclasses.fields(cls.Config)
        assert [option.name for option in index[name].options] == [f.name for f in fields]
        # Defaults and declared values as the registry has them: the early checks read the same declarations.
        defaults = cls.Config()
        for option, field in zip(index[name].options, fields):
            assert option.default == getattr(defaults, field.name), (name, field.name)
            assert type(option.default) is type(getattr(defaults, field.name)), (name, field.name)
            assert option.allowed == allowed_values(field), (name, field.name)
        # The early message for an unknown option is the registry's own, defaults included.
        with pytest.raises(KVBenchError) as late:
            get_method(f"{name}:no_such_option=1")
        with pytest.raises(KVBenchError) as early:
            fast_checks.check_method(f"{name}:no_such_option=1")
        assert str(early.value) == str(late.value)
        # And for values (tests/test_option_ranges.py goes through every field): the same line, early and late.
        for field in fields:
            for text in ("-3", "abc"):
                spec = f"{name}:{field.name}={text}"
                try:
                    get_method(spec)
                    late_message = None
                except KVBenchError as error:
                    late_message = str(error)
                try:
                    fast_checks.check_method(spec)
                    early_message = None
                except KVBenchError as error:
                    early_message = str(error)
                if early_message is not None:
                    assert early_message == late_message, spec


def test_max_length_comes_from_the_config_alone(config_only_model, tiny_model_dir):
    assert model_max_length(config_only_model) == 2048
    assert model_max_length(tiny_model_dir) == 2048


def test_gguf_header_reader_skips_arrays_and_finds_the_context_length(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_token_list(["<s>", "</s>", "hello"])
    writer.add_token_scores([0.0, 0.5, 1.0])
    writer.add_context_length(4096)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    assert gguf_context_length(str(path)) == 4096
    assert model_max_length(str(path)) == 4096


def test_the_embedded_model_length_is_read_from_its_gguf_header():
    try:
        assert model_max_length("smollm2-135m") == 8192
    except KVBenchError as error:
        pytest.skip(str(error))


def test_an_uncached_hub_id_offline_is_unknown_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(KVBenchError, match="not in the local Hugging Face cache"):
        model_max_length("no-such-org/no-such-model")


def test_lm_eval_task_names_found_in_a_config_are_left_to_lm_eval(tmp_path):
    pytest.importorskip("lm_eval")
    (tmp_path / "mine.yaml").write_text("task: my_local_task\n")
    assert fast_checks.absent_lm_eval_tasks(["my_local_task", "arc_easy", "surely_absent"], [str(tmp_path)]) == [
        "surely_absent"
    ]


def test_the_errors_benchmark_runs_its_cases(monkeypatch, capsys):
    import runpy

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "errors.py"
    monkeypatch.setattr(sys, "argv", ["errors.py", "--only", "report"])
    with pytest.raises(SystemExit) as finished:
        runpy.run_path(str(script), run_name="__main__")
    assert finished.value.code == 0
    out = capsys.readouterr().out
    assert "report: missing run dir" in out and "kvbench: error: no run.json" in out


def test_cuda_absence_is_read_from_the_environment_and_files(monkeypatch):
    cuda_build = {"__version__": "2.5.0+cu121", "cuda": "12.1", "hip": None}
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(fast_checks.sys, "platform", "linux")
    monkeypatch.setattr(fast_checks, "_torch_build", lambda: cuda_build)
    monkeypatch.setattr(fast_checks, "_nvidia_driver_loaded", lambda: False)
    assert fast_checks.cuda_absence() == "no NVIDIA driver is loaded (no /proc/driver/nvidia, no /dev/nvidia*)"
    monkeypatch.setattr(fast_checks, "_nvidia_driver_loaded", lambda: True)
    assert fast_checks.cuda_absence() is None  # a driver: only torch can tell
    for hidden in ("", "-1", "-1,0"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert "hides every GPU" in fast_checks.cuda_absence()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert fast_checks.cuda_absence() is None
    monkeypatch.setattr(fast_checks, "_torch_build", lambda: {"__version__": "2.13.0+cpu", "cuda": None, "hip": None})
    assert fast_checks.cuda_absence() == "this torch (2.13.0+cpu) is built without CUDA"
    monkeypatch.setattr(fast_checks, "_torch_build", lambda: {"__version__": "2.5.0+rocm6", "cuda": None, "hip": "6.2"})
    monkeypatch.setattr(fast_checks, "_nvidia_driver_loaded", lambda: False)
    assert fast_checks.cuda_absence() is None  # ROCm serves torch.cuda without an NVIDIA driver: torch decides
    monkeypatch.setattr(fast_checks, "_torch_build", lambda: None)
    assert fast_checks.cuda_absence() is None


def test_the_torch_build_is_read_without_importing_torch():
    script = BLOCKED + "from kvbench.harness.cli import fast_checks\nprint(repr(fast_checks._torch_build()))\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    import torch

    assert ast.literal_eval(done.stdout) == {
        "__version__": torch.__version__,
        "cuda": torch.version.cuda,
        "hip": torch.version.hip,
    }


def test_cuda_the_files_cannot_rule_out_is_asked_of_torch_before_the_model_loads(
    monkeypatch, capsys, tiny_model_dir, tmp_path
):
    import torch

    import kvbench.harness.runner.sweep

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before CUDA was checked")

    monkeypatch.setattr(kvbench.harness.runner.sweep, "load_model", no_load)
    monkeypatch.setattr(fast_checks, "cuda_absence", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    assert main(RUN + ["--device", "cuda", "--model", tiny_model_dir, "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        "kvbench: error: --device cuda was asked for but no CUDA device is available; use --device cpu\n"
    )
    assert not out.exists()  # refused before --out was created
    fast_checks.check_cuda_with_torch("cpu")  # nothing to ask
