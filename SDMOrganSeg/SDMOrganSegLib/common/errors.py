"""The one exception type that carries a message meant for the user, and how a run is cancelled."""

import threading
from typing import Callable, Optional, Union

#: ``progress(fraction, message)``: fraction in [0, 1] and a short message.
ProgressCallback = Callable[[float, str], None]
#: A cancel request: a ``threading.Event``, or any callable that returns True to stop. ``typing.Union``
#: and not ``|``: this alias is evaluated at import, and Slicer 5.6 and 5.8 embed Python 3.9.
CancelCheck = Union[Callable[[], bool], threading.Event]


class SDMOrganSegError(Exception):
    """A problem the user can fix: the message names the problem and the fix.

    Entry points (command line, batch script, Slicer panel) print ``str(error)`` on one line and never
    a traceback; any other exception is a bug in this package.
    """


class InputMismatchError(SDMOrganSegError):
    """The input is not the kind of image the model was trained on (an MR given to a CT model): refused before
    the network runs, unless the run is forced (``--force``; the Slicer panel asks). ``reason`` is the
    mismatch alone, without the command-line advice."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


class CancelledError(SDMOrganSegError):
    """The user asked to stop; whatever the run had made is discarded."""

    def __init__(self, message: str = "cancelled by the user") -> None:
        super().__init__(message)


def stop_requested(cancel: Optional[CancelCheck]) -> bool:
    """True when ``cancel`` (an Event, a callable or None) asks to stop."""
    if cancel is None:
        return False
    return cancel.is_set() if isinstance(cancel, threading.Event) else bool(cancel())


def check_cancel(cancel: Optional[CancelCheck]) -> None:
    """Raise :class:`CancelledError` when ``cancel`` asks to stop."""
    if stop_requested(cancel):
        raise CancelledError()
