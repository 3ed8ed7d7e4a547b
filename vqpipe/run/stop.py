"""SIGINT and SIGTERM while a run goes: the first asks the driver to stop handing out shards and
wind down (workers stopped, manifest ``interrupted``, summary printed); a second Ctrl-C exits at
once, for a person who will not wait for the bookkeeping."""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Records the first stop signal; :meth:`install` hands SIGINT/SIGTERM to it.

    Ray's ``init`` sets its own SIGTERM handler (``sys.exit`` from inside ``ray.wait``, which
    ends in a C++ abort), so the driver installs this again once Ray is up."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_status(self) -> int:
        """The shell's convention: 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + (self.signum or 0)

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for signum in SIGNALS:
            previous = signal.signal(signum, self._handle)
            self._previous.setdefault(signum, previous)

    def restore(self) -> None:
        """Hand the signals back, unless one came: then a second Ctrl-C during Ray's shutdown
        must still exit at once."""
        if self.requested:
            return
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                os._exit(128 + signum)  # a second Ctrl-C: the person wants out now
            return
        self.signum = signum
        log.warning("%s received: stopping after the bookkeeping (Ctrl-C again to exit at once)",
                    signal.Signals(signum).name)
