"""The one error type the task suite raises for mistakes a user can make."""

from kvbench.harness.errors import KVBenchError


class TaskError(KVBenchError, ValueError):
    """A task request that cannot be served: unknown task, length too small, bad file.

    A KVBenchError so the CLI reports it in one line; a ValueError so callers that already guard
    against bad values keep working. The message says what to change.
    """
