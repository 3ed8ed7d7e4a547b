"""One run at a time per output folder: a lease under ``_vqpipe/``, taken create-only and kept
fresh by a heartbeat; a second run is refused while it is live, and a lease whose heartbeat
stopped (its run was killed), or whose process on this machine is gone, is taken over.

Two runs at once would stay exactly once (commit markers are create-only), but each would
overwrite the other's manifest, and ``--overwrite`` would delete what the other is writing.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from vqpipe.config import RunConfig
from vqpipe.output import retry, storage
from vqpipe.output.layout import LEASE

log = logging.getLogger(__name__)

HEARTBEAT_S = 10.0
# A lease not refreshed for this long belongs to a dead run. Generous: the holder's and the
# reader's clocks may differ, and a loaded machine may delay a heartbeat.
STALE_S = 60.0


class OutputBusy(RuntimeError):
    """Another live run holds the output folder."""


@dataclass(frozen=True)
class Holder:
    owner: str
    host: str
    pid: int
    heartbeat_at: float

    def dead_here(self) -> bool:
        """Held by a process of this machine that no longer exists (a killed run resumed at once:
        no need to wait for its heartbeat to go stale)."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False  # alive, another user's
        return False

    def describe(self, now: float) -> str:
        return f"host {self.host}, pid {self.pid}, last heartbeat {now - self.heartbeat_at:.0f} s ago"


class Lease:
    """``with Lease(config):`` holds the output folder for the block, or raises :class:`OutputBusy`."""

    def __init__(self, config: RunConfig, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S) -> None:
        self.fs, root = storage.filesystem(config.output.path, config.output.storage_options)
        self.path = posixpath.join(root, LEASE)
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.owner = uuid.uuid4().hex
        self.lost = False  # set when another run took the lease over (our heartbeat stalled)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        retry.call(lambda: self.fs.makedirs(posixpath.dirname(self.path), exist_ok=True), f"mkdir for {self.path}")
        if not storage.write_create_only(self.fs, self.path, self._body()):
            self._take_over_if_stale()
        self._thread = threading.Thread(target=self._beat, name="vqpipe-lease", daemon=True)
        self._thread.start()

    def _take_over_if_stale(self) -> None:
        holder = self._holder()
        now = time.time()
        if holder is not None and now - holder.heartbeat_at < self.stale_s and not holder.dead_here():
            raise OutputBusy(f"another run is writing this output ({holder.describe(now)}); wait for it to end, "
                             f"or, if it is dead, for its lease to go stale ({self.stale_s:.0f} s)")
        log.warning("taking over the lease of a run that stopped heartbeating (%s)",
                    holder.describe(now) if holder else "unreadable lease")
        storage.remove_file(self.fs, self.path)
        if not storage.write_create_only(self.fs, self.path, self._body()):
            raise OutputBusy("another run took this output's stale lease at the same moment")

    def _holder(self) -> Holder | None:
        storage.invalidate(self.fs, self.path)
        try:
            data = storage.read_json(self.fs, self.path)
            return Holder(data["owner"], data["host"], int(data["pid"]), float(data["heartbeat_at"]))
        except (ValueError, KeyError, TypeError):
            return None  # half-written or foreign: treated as stale

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                holder = self._holder()
                if holder is not None and holder.owner != self.owner:
                    self.lost = True
                    log.error("another run took over this output's lease (%s)", holder.describe(time.time()))
                    return
                retry.call(lambda: storage.write_atomic(self.fs, self.path, self._body()), f"write {self.path}")
            except OSError as err:  # one missed beat is not fatal; STALE_S spans several
                log.warning("lease heartbeat failed: %s: %s", type(err).__name__, err)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = self._holder()
        if holder is not None and holder.owner == self.owner:
            storage.remove_file(self.fs, self.path)

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "heartbeat_at": time.time()}).encode()
