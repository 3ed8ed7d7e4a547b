"""Fault injection for the crash tests (kill a worker mid-shard), off unless ``VQPIPE_FAULTS`` is set.

``VQPIPE_FAULTS`` holds JSON: ``[{"stem": "shard-0001", "after_batches": 1, "action": "exit",
"once": "/tmp/flag"}]``; ``stem`` is a shard's whole stem or its file-name part (``shard-0001`` for
``shard-0001-1b2c3d4e``). ``action`` is ``exit`` (``os._exit``: the process dies as if killed),
``raise``, ``sleep`` (for ``seconds``: a straggler) or ``stop`` (SIGSTOP itself: a worker hung for
good). ``{"at": "worker_start", "action": "raise"}`` fails a worker's constructor instead. With
``once``, the fault fires only for the attempt that creates that file, so the retry succeeds.

``{"action": "non_finite", "precision": "fp16"}`` makes the first image of every batch encoded
in that precision come out NaN, as an overflowing checkpoint would (the fp32 redo is untouched).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time

ENV = "VQPIPE_FAULTS"


class InjectedFault(RuntimeError):
    pass


@functools.lru_cache(maxsize=1)
def _faults(raw: str) -> tuple[dict, ...]:
    return tuple(json.loads(raw)) if raw else ()


def after_batch(stem: str, batches_done: int) -> None:
    for fault in _faults(os.environ.get(ENV, "")):
        if fault.get("stem") in (stem, stem.rsplit("-", 1)[0]) and fault.get("after_batches") == batches_done and _claim(fault.get("once")):
            action = fault.get("action", "exit")
            if action == "exit":
                os._exit(137)
            if action == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)  # hung for good, as a stopped or wedged process is
                continue
            if action == "sleep":
                time.sleep(float(fault.get("seconds", 60)))
                continue
            raise InjectedFault(f"injected fault in {stem} after batch {batches_done}")


def poison_latents(latents, precision: str):
    """``latents`` with image 0 set to NaN when a ``non_finite`` fault names ``precision``."""
    for fault in _faults(os.environ.get(ENV, "")):
        if fault.get("action") == "non_finite" and fault.get("precision") == precision:
            latents = latents.clone()
            latents[:1] = float("nan")
    return latents


def worker_start() -> None:
    """Faults with ``"at": "worker_start"`` fire as a worker starts: ``raise`` makes its
    constructor fail (as a broken install or an unreadable model would)."""
    for fault in _faults(os.environ.get(ENV, "")):
        if fault.get("at") == "worker_start" and _claim(fault.get("once")):
            if fault.get("action", "raise") == "exit":
                os._exit(137)
            raise InjectedFault("injected fault as the worker starts")


def _claim(flag: str | None) -> bool:
    if flag is None:
        return True
    try:
        os.close(os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False
