"""The one error type the report renderer raises for mistakes a user can make."""


class ReportError(ValueError):
    """A run directory that cannot be reported on; the message is one line that says what to fix.

    A ValueError subclass so callers that already guard against bad values keep working.
    """
