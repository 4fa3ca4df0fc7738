"""The dependency ranges: the import-time check agrees with pyproject.toml and stops an out-of-range
environment with one line (faked versions here; .ci/floors installs the real floors)."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from kvbench.harness import requirements
from kvbench.harness.requirements import DependencyError, check, parse_requirement, problems, release

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
OLD_TRANSFORMERS = "transformers 5.2.0 is installed but kvbench needs transformers>=5.13,<6"


def test_the_checked_ranges_are_pyprojects_dependencies():
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    assert list(requirements.REQUIREMENTS) == project["dependencies"]
    for text in requirements.REQUIREMENTS:
        name, floor, _ = parse_requirement(text)
        assert floor, f"{name} has no floor"


def test_versions_compare_by_release():
    assert release("2.13.0+cpu") == release("2.13") == (2, 13)
    assert release("5.13.1") > release("5.13") > release("5.12.1")
    assert release("0.4.10") > release("0.4.9.2")
    assert parse_requirement("lm-eval>=0.4.10,<0.5") == ("lm-eval", "0.4.10", "0.5")


def fake_versions(monkeypatch, **versions):
    real = requirements.installed_version
    monkeypatch.setattr(
        requirements, "installed_version", lambda name: versions.get(name.replace("-", "_"), real(name))
    )


def test_an_old_transformers_is_one_line_naming_installed_and_needed(monkeypatch):
    fake_versions(monkeypatch, transformers="5.2.0")
    with pytest.raises(ImportError) as raised:
        check()
    assert isinstance(raised.value, DependencyError)
    assert str(raised.value) == f"{OLD_TRANSFORMERS}: pip install 'transformers>=5.13,<6'"


def test_a_version_past_the_cap_and_every_bad_package_are_named(monkeypatch):
    fake_versions(monkeypatch, transformers="6.0.0", torch="2.6.0+cu124")
    message = str(pytest.raises(DependencyError, check).value)
    assert "\n" not in message
    assert "torch 2.6.0+cu124 is installed but kvbench needs torch>=2.13" in message
    assert "transformers 6.0.0 is installed but kvbench needs transformers>=5.13,<6" in message


def test_in_range_and_missing_packages_pass(monkeypatch):
    fake_versions(monkeypatch, transformers="5.13.0", torch="2.13.0+cpu")
    assert problems() == []
    assert problems(("no-such-package>=1.0",)) == []


def run_python(code: str, tmp_path) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter that finds an installed transformers 5.2.0 first: a dist-info directory
    (what pip leaves behind) at the head of sys.path, as importlib.metadata and kvbench both read it."""
    fake = tmp_path / "site" / "transformers-5.2.0.dist-info"
    fake.mkdir(parents=True)
    (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: transformers\nVersion: 5.2.0\n")
    env = {**os.environ, "PYTHONPATH": str(fake.parent)}
    check = "import importlib.metadata as m; assert m.version('transformers') == '5.2.0'; import sys; "
    return subprocess.run([sys.executable, "-c", check + code], capture_output=True, text=True, timeout=120, env=env)


def test_the_cli_says_it_in_one_line_and_exits_2(tmp_path):
    done = run_python(
        "sys.argv = ['kvbench', 'list', 'methods']; from kvbench.harness.cli.commands import main", tmp_path
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"kvbench: error: {OLD_TRANSFORMERS}: pip install 'transformers>=5.13,<6'"]


def test_a_library_import_raises_an_import_error_with_the_line(tmp_path):
    done = run_python(
        "\ntry:\n    import kvbench.harness\nexcept ImportError as error:\n    print(type(error).__name__, error)\n",
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"DependencyError {OLD_TRANSFORMERS}: pip install 'transformers>=5.13,<6'"]
    assert "torch" not in done.stderr


def test_installed_versions_are_importlib_metadatas():
    """The check reads versions off dist-info directory names; importlib.metadata (the reference) agrees on every
    dependency, installed or not."""
    from importlib import metadata

    for text in requirements.REQUIREMENTS + ("no-such-package>=1",):
        name = parse_requirement(text)[0]
        try:
            expected = metadata.version(name)
        except metadata.PackageNotFoundError:
            expected = None
        assert requirements.installed_version(name) == expected, name
