"""The one exception type that carries a message meant for the user."""


class SDMOrganSegError(Exception):
    """A problem the user can fix: the message names the problem and the fix.

    Entry points (command line, batch script, Slicer panel) print ``str(error)`` on one line and never
    a traceback; any other exception is a bug in this package.
    """


class CancelledError(SDMOrganSegError):
    """The user asked to stop; whatever the run had made is discarded."""

    def __init__(self, message: str = "cancelled by the user") -> None:
        super().__init__(message)
