"""The `kvbench` command (`commands`), its argument checks that run before torch is imported (`fast_checks`) and
`kvbench train` (`train`). User errors end here as one line on stderr and exit code 2.
"""

from kvbench.harness.moved import forward_names as _forward_names

# The flat layout's `kvbench.harness.cli` module is `kvbench.harness.cli.commands` now: its names still resolve here.
__getattr__ = _forward_names(__name__, "kvbench.harness.cli.commands")
