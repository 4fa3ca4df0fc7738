"""lm-eval's own command line with kvbench's model registered: `python -m kvbench.harness.lm_eval.cli run ...`.

lm-eval's CLI resolves `--model kvbench` by name but imports no plug-ins; running it through this module
imports `kvbench.harness` first, which registers the name.
"""

from __future__ import annotations

import kvbench.harness  # noqa: F401  (registers the lm-eval model name `kvbench`)


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
