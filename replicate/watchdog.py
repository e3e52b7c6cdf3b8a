"""The hang watchdog: a process that stops making progress ends instead of hanging its job.

A process of a multi-process job is either waiting at a collective (the
others are expected there too) or doing its own work between collectives
(callbacks, the data pipeline, user code). When its own work, or a wait,
lasts far longer than the job's hang limit, the others would wait for ever:
the watchdog prints where this process is and ends it, and the launcher
(`horovodrun`, `replicate launch`) then ends the job.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import traceback
from collections.abc import Iterator

# The exit status of a process that the watchdog stopped (EX_TEMPFAIL).
HUNG_EXIT_CODE = 75


class Watchdog:
    """Stops a process that makes no progress, so that its job ends instead of hanging.

    A process is either waiting at a collective (a training or evaluation
    step, a broadcast, an agreement on step counts) or doing its own work
    between them (callbacks, the data pipeline, user code). Its own work
    taking longer than `limit` seconds means the others wait for it: the
    watchdog prints where this process is and ends it with exit status 75,
    and the launcher (`horovodrun`, `replicate launch`) stops the others.
    Waiting at a collective for more than three times `limit` (a peer that
    froze without its own watchdog running) ends the process the same way.

    Args:
        rank, size: This process and the number of processes (for messages).
        limit: Seconds; 0 disables the watchdog.
    """

    def __init__(self, rank: int, size: int, limit: float) -> None:
        self.rank, self.size, self.limit = rank, size, float(limit)
        self._lock = threading.Lock()
        self._waiting = 0
        self._since = time.monotonic()
        self._fetches: dict[int, float] = {}
        self._stop: threading.Event | None = None

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """Marks a collective (or a step made of them): the others are expected here too."""
        with self._lock:
            self._waiting += 1
            self._since = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._waiting -= 1
                self._since = time.monotonic()

    @contextlib.contextmanager
    def fetching(self) -> Iterator[None]:
        """Marks this process's own data loading (it may run inside a step)."""
        key = threading.get_ident()
        with self._lock:
            self._fetches[key] = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._fetches.pop(key, None)

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Runs the watchdog's thread for the duration of a `fit` or `evaluate`."""
        if self.limit <= 0 or self.size == 1 or self._stop is not None:
            yield
            return
        self._stop = threading.Event()
        self._since = time.monotonic()
        thread = threading.Thread(target=self._watch, daemon=True, name="replicate-watchdog")
        thread.start()
        try:
            yield
        finally:
            self._stop.set()
            thread.join()
            self._stop = None

    def _watch(self) -> None:
        main = threading.main_thread().ident
        while not self._stop.wait(min(1.0, self.limit / 10)):
            now = time.monotonic()
            with self._lock:
                idle = now - self._since
                waiting = self._waiting > 0
                fetches = {k: now - t for k, t in self._fetches.items()}
            stuck = [k for k, spent in fetches.items() if spent > self.limit]
            if stuck:
                self._end(f"loading data for {fetches[stuck[0]]:.0f} s", stuck[0])
            elif not waiting and idle > self.limit:
                self._end(
                    f"made no progress for {idle:.0f} s outside the collective steps (in a "
                    "callback, the data pipeline or other code between steps), while the "
                    "other processes wait for it",
                    main,
                )
            elif waiting and idle > 3 * self.limit:
                self._end(
                    f"waited {idle:.0f} s at a collective for the other processes, which "
                    "did not arrive (one may have frozen, or be stuck inside its step)",
                    main,
                )

    def _end(self, what: str, thread_id: int) -> None:
        frame = sys._current_frames().get(thread_id)
        where = "".join(traceback.format_stack(frame)) if frame is not None else "(unknown)\n"
        sys.stderr.write(
            f"replicate: process {self.rank} of {self.size} {what}. Stopping it (exit status "
            f"{HUNG_EXIT_CODE}) so that the job ends instead of hanging; the limit is "
            f"{self.limit:g} s (REPLICATE_HANG_TIMEOUT=<seconds>, or hang_timeout= in the "
            f"backend's options; 0 turns this off). It was at:\n{where}"
        )
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(HUNG_EXIT_CODE)
