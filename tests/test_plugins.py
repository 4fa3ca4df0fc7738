"""Methods from other packages: entry points of the group `kvbench.methods` add methods to the registry, and a
broken plug-in is one line on stderr that breaks neither the others nor the built-ins.

The end-to-end tests build the README's example plug-in (its "Add your own method" section, verbatim) and two
broken ones, install them into a fresh virtual environment that sees the system's torch, transformers and kvbench,
and run `kvbench` there in subprocesses, as a user would.
"""

from __future__ import annotations

import json
import os
import re
import site
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

import kvbench.harness.cli.fast_checks as fast_checks
import kvbench.methods as methods
from kvbench.harness.errors import UnknownNameError
from kvbench.harness.plugins import GROUP

README = Path(__file__).resolve().parent.parent / "README.md"

BROKEN_SOURCE = '"""A plug-in whose dependency is missing."""\n\nimport kvbench_missing_dependency  # noqa: F401\n'
CLASH_SOURCE = '''"""A plug-in that takes a built-in's name."""

from kvbench.methods import register
from kvbench.methods.streaming_llm import StreamingLLM


@register
class Clash(StreamingLLM):
    name = "snapkv"
'''


def readme_example() -> tuple[str, str]:
    """The method module and the pyproject.toml of the README's "Add your own method" section."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Add your own method") :]
    section = section[: section.index("\n## ", 1)]
    python = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    toml = re.search(r"```toml\n(.*?)```", section, re.S).group(1)
    return python, toml


def write_package(root: Path, dist: str, module: str, source: str, entry_point: str) -> Path:
    root.mkdir()
    (root / f"{module}.py").write_text(source)
    (root / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""\
            [build-system]
            requires = ["setuptools>=68"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "{dist}"
            version = "0.1.0"

            [project.entry-points."{GROUP}"]
            {entry_point} = "{module}"

            [tool.setuptools]
            py-modules = ["{module}"]
            """
        )
    )
    return root


def fresh_venv_seeing_this_interpreter(venv: Path) -> Path:
    """A new venv that sees the packages of the interpreter running the tests (torch, transformers, kvbench,
    pip, setuptools), whatever that interpreter is: the system's, a venv's or a conda env's.

    `venv --system-site-packages` would not do: run from inside a venv it exposes the *base* interpreter's
    packages, not the venv's. So the new venv gets a .pth file that adds this interpreter's site directories
    with `site.addsitedir`, which also runs their .pth files (the editable install of kvbench is one)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    inner_site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    outer = [*site.getsitepackages(), site.getusersitepackages()]
    Path(inner_site, "_kvbench_tests_outer_site.pth").write_text(
        f"import site; list(map(site.addsitedir, {outer!r}))\n"
    )
    probe = subprocess.run(
        [python, "-c", "import setuptools, pip, torch, kvbench.harness"], capture_output=True, text=True
    )
    assert probe.returncode == 0, f"the venv does not see this interpreter's packages: {probe.stderr}"
    return python


@pytest.fixture(scope="module")
def plugin_python(tmp_path_factory) -> Path:
    """A venv's python with the README's plug-in and two broken ones installed (torch & co. from the interpreter
    running the tests)."""
    root = tmp_path_factory.mktemp("plugins")
    python = fresh_venv_seeing_this_interpreter(root / "venv")
    module, pyproject = readme_example()
    example = root / "first-tokens"
    example.mkdir()
    (example / "kvbench_first_tokens.py").write_text(module)
    (example / "pyproject.toml").write_text(pyproject)
    broken = write_package(root / "broken", "kvbench-broken-plugin", "kvbench_broken_plugin", BROKEN_SOURCE, "broken")
    clash = write_package(root / "clash", "kvbench-clash-plugin", "kvbench_clash_plugin", CLASH_SOURCE, "clash")
    installed = subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index"]
        + [str(example), str(broken), str(clash)],
        capture_output=True,
        text=True,
        cwd=root,
    )
    assert installed.returncode == 0, f"pip install of the plug-ins failed:\n{installed.stdout}\n{installed.stderr}"
    return python


def kvbench(python: Path, *argv: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "KVBENCH_CACHE_DIR": str(cache)}
    # Run outside the checkout so that only the installed packages are importable.
    return subprocess.run(
        [python, "-m", "kvbench.harness.cli.commands", *argv], capture_output=True, text=True, env=env, cwd=cache.parent
    )


def assert_failures_said_once(stderr: str) -> None:
    lines = [line for line in stderr.splitlines() if line.startswith("kvbench: plug-in")]
    assert sorted(lines) == [
        "kvbench: plug-in broken (dist kvbench-broken-plugin 0.1.0) failed to load: "
        "ModuleNotFoundError: No module named 'kvbench_missing_dependency'",
        "kvbench: plug-in clash (dist kvbench-clash-plugin 0.1.0) failed to load: ValueError: method name 'snapkv' "
        "of kvbench_clash_plugin.Clash is taken by kvbench.methods.snapkv.SnapKV; rename one",
    ]


def test_list_methods_shows_where_each_comes_from(plugin_python, tmp_path):
    listed = kvbench(plugin_python, "list", "methods", cache=tmp_path / "cache")
    assert listed.returncode == 0, listed.stderr
    origins = {line.split()[0]: line for line in listed.stdout.splitlines()}
    assert "kvbench-first-tokens 0.1.0" in origins["first_tokens"]
    assert "built-in" in origins["snapkv"] and "built-in" in origins["full"]
    assert "kvbench-clash-plugin" not in listed.stdout
    assert_failures_said_once(listed.stderr)


def test_a_plugin_method_runs_in_a_sweep_next_to_the_built_ins(plugin_python, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    argv = ["run", "--model", tiny_model_dir, "--methods", "full,snapkv,first_tokens", "--budgets", "0.5"]
    argv += ["--tasks", "niah_single_1", "--lengths", "512", "--samples", "1", "--out", str(out)]
    ran = kvbench(plugin_python, *argv, "--no-report", "--no-progress", cache=tmp_path / "cache")
    assert ran.returncode == 0, ran.stderr
    assert_failures_said_once(ran.stderr)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    by_method = {row["method"]: row for row in rows}
    assert set(by_method) == {"full", "snapkv", "first_tokens"}
    plugin_row = by_method["first_tokens"]
    assert plugin_row["budget"] == 0.5 and plugin_row.get("refused") in (None, False)
    assert 0 < plugin_row["kv_bytes"] <= 0.5 * plugin_row["kv_bytes_full"]


def test_an_unknown_name_is_checked_against_the_plugins_too(plugin_python, tiny_model_dir, tmp_path):
    argv = ["run", "--model", tiny_model_dir, "--methods", "first_tokens,nope", "--budgets", "0.5"]
    argv += ["--tasks", "niah_single_1", "--lengths", "512", "--out", str(tmp_path / "run"), "--no-report"]
    ran = kvbench(plugin_python, *argv, cache=tmp_path / "cache")
    assert ran.returncode == 2
    error = [line for line in ran.stderr.splitlines() if not line.startswith("kvbench: plug-in")]
    assert len(error) == 1 and "unknown method 'nope'" in error[0]
    assert "first_tokens" in error[0] and "plug-ins that failed to load: broken, clash" in error[0]


# In-process: the loader's rules, with entry points made up for the test.


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """load_plugins as in a new process, over made-up entry points; the registry is restored afterwards."""
    methods.load_all()
    saved = dict(methods.REGISTRY)
    monkeypatch.setattr(methods, "_plugins_loaded", False)
    monkeypatch.setattr(methods, "_FAILED", {})
    monkeypatch.setattr(methods, "_PLUGIN_ORIGINS", {})
    monkeypatch.syspath_prepend(str(tmp_path))
    entry_points: list[metadata.EntryPoint] = []
    monkeypatch.setattr(methods, "method_entry_points", lambda: entry_points)

    def add(name: str, value: str, source: str | None = None) -> None:
        if source is not None:
            (tmp_path / f"{value.partition(':')[0]}.py").write_text(textwrap.dedent(source))
        entry_points.append(metadata.EntryPoint(name, value, GROUP))

    yield add
    methods.REGISTRY.clear()
    methods.REGISTRY.update(saved)
    for module in [name for name in sys.modules if name.startswith("kvbench_test_plugin_")]:
        del sys.modules[module]


FIRST_TOKENS_CLASS = """
from kvbench.methods.base import Method, register
from kvbench.methods.full import FullConfig


class OneFirst(Method):
    name = "{name}"
    family = "token eviction"
    description = "test"
    Config = FullConfig

    def _compress(self, observation, budget):
        raise NotImplementedError
"""


def test_a_plugin_class_or_module_registers_and_a_failure_leaves_the_registry_as_it_was(fresh_loader, capsys):
    fresh_loader("by_class", "kvbench_test_plugin_a:OneFirst", FIRST_TOKENS_CLASS.format(name="plugin_a"))
    # Registers one name, then fails on the second: neither may stay.
    half = (
        FIRST_TOKENS_CLASS.format(name="plugin_b")
        + "\nregister(OneFirst)\nregister(type('X', (OneFirst,), {'name': 'full'}))\n"
    )
    fresh_loader("half", "kvbench_test_plugin_b", half)
    fresh_loader("empty", "kvbench_test_plugin_c", "VALUE = 1\n")
    fresh_loader("missing", "kvbench_test_plugin_not_written")
    before = set(methods.REGISTRY)
    methods.load_all()
    assert set(methods.REGISTRY) - before == {"plugin_a"}
    assert methods.method_origin("plugin_a") == "unknown distribution"
    assert methods.method_origin("full") == "built-in"
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("kvbench: plug-in ") for line in err)
    assert "plug-in half " in err[0] and "ValueError: method name 'full'" in err[0]
    assert "plug-in empty " in err[1] and "registers no method" in err[1]
    assert "plug-in missing " in err[2] and "ModuleNotFoundError" in err[2]
    methods.load_all()
    methods.list_methods()
    assert capsys.readouterr().err == ""  # once per process
    with pytest.raises(UnknownNameError, match=r"plug-ins that failed to load: empty, half, missing"):
        methods.get_method("plugin_b")


def test_fast_checks_leave_unknown_names_to_the_registry_when_plugins_exist(monkeypatch):
    monkeypatch.setattr(fast_checks, "method_entry_points", lambda: [])
    with pytest.raises(UnknownNameError, match="unknown method 'first_tokens'"):
        fast_checks.check_method("first_tokens")
    monkeypatch.setattr(fast_checks, "method_entry_points", lambda: [metadata.EntryPoint("x", "x", GROUP)])
    fast_checks.check_method("first_tokens")
