"""How many cells decode together by default, and the check of a user's choice: torch-free, so that the CLI
checks `--batch-size` before torch loads."""

from __future__ import annotations

from kvbench.harness.errors import KVBenchError

# Cells of one sample per decode batch. 1 (each cell alone, the reference path) until a measurement on the target
# device (benchmarks/sweep.py --batch-size N) shows which size helps there.
DEFAULT_BATCH_SIZE = 1


def check_batch_size(size: int) -> int:
    if size < 1:
        raise KVBenchError(f"--batch-size {size} must be at least 1 (1 decodes every cell alone)")
    return size
