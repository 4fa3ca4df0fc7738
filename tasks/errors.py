"""The one error type the task suite raises for mistakes a user can make."""


class TaskError(ValueError):
    """A task request that cannot be served: unknown task, length too small, bad file.

    A ValueError subclass so callers that already guard against bad values keep working;
    the message is one line that says what to change.
    """
