"""Where methods from other packages are found: entry points of the group `kvbench.methods`.

Only package metadata is read here, never a plug-in's code, so the argument checks that run before torch is
imported (`fast_checks`) can tell whether any plug-in could add a method name. Loading them is
`kvbench.methods.load_plugins`.
"""

from __future__ import annotations

from importlib import metadata

GROUP = "kvbench.methods"


def method_entry_points() -> list[metadata.EntryPoint]:
    """The installed entry points of the group, once each (a distribution seen twice on sys.path lists them twice)."""
    seen: dict[tuple[str, str], metadata.EntryPoint] = {}
    for entry_point in metadata.entry_points(group=GROUP):
        seen.setdefault((entry_point.name, entry_point.value), entry_point)
    return list(seen.values())


def distribution_label(entry_point: metadata.EntryPoint) -> str:
    """`NAME VERSION` of the distribution that declares the entry point: what a user installed."""
    dist = entry_point.dist
    if dist is None:
        return "unknown distribution"
    return f"{dist.metadata['Name'] or dist.name} {dist.version}"
