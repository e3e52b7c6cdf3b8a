"""The hang watchdog: a process that stops making progress ends instead of hanging its job.

A process of a multi-process job is either waiting at a collective (the
others are expected there too), doing its own work between collectives
(callbacks, the data pipeline, user code), or writing a file that replicate
knows of (the chief's `save`, `ModelCheckpoint`, backups, export). When its
own work, or a wait, lasts far longer than the job's hang limit, the others
would wait for ever: the watchdog prints where this process is and ends it,
and the launcher (`horovodrun`, `replicate launch`) then ends the job. Known
writes, and the other processes' waits for them, are never cut short: a
large checkpoint on network storage may take longer than any limit.

The default limit, 30 minutes, follows torch.distributed's default timeout
for collectives (`default_pg_timeout`, 30 minutes for Gloo; PyTorch 2.2 and
later use 10 minutes for NCCL only). Horovod only warns about a stall (after
60 s, `--stall-check-warning-time-seconds`) and never stops one unless
`--stall-check-shutdown-time-seconds` is set; MultiWorkerMirroredStrategy's
collectives have no timeout unless `CommunicationOptions(timeout_seconds=...)`
is given.
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
# Seconds; torch.distributed's default collective timeout (Gloo), 30 minutes.
DEFAULT_HANG_TIMEOUT = 1800.0


class Watchdog:
    """Stops a process that makes no progress, so that its job ends instead of hanging.

    A process is either waiting at a collective (a training or evaluation
    step, a broadcast, an agreement on step counts or positions), doing its
    own work between them (callbacks, the data pipeline, user code), or
    writing one of the files replicate knows of. Its own work taking longer
    than `limit` seconds means the others wait for it: the watchdog prints
    where this process is and ends it with exit status 75, and the launcher
    (`horovodrun`, `replicate launch`) stops the others. Waiting at a
    collective for more than three times `limit` (a peer that froze without
    its own watchdog running) ends the process the same way.

    Two kinds of time never count: `writing()` (the chief writing a model,
    checkpoint, backup or export) and a wait announced with `expect_writer()`
    (the other processes waiting for that write).

    Args:
        rank, size: This process and the number of processes (for messages).
        limit: Seconds; 0 disables the watchdog.
    """

    def __init__(self, rank: int, size: int, limit: float) -> None:
        self.rank, self.size, self.limit = rank, size, float(limit)
        self._lock = threading.Lock()
        self._waiting = 0
        self._writing = 0
        self._writer_expected = False
        self._for_writer = False
        self._since = time.monotonic()
        self._fetches: dict[int, float] = {}
        self._stop: threading.Event | None = None

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """Marks a collective (or a step made of them): the others are expected here too.

        If `expect_writer()` was called since the last wait, this wait is for a
        writer and has no limit.
        """
        with self._lock:
            self._waiting += 1
            if self._writer_expected:
                self._writer_expected, self._for_writer = False, True
            self._since = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._waiting -= 1
                if not self._waiting:
                    self._for_writer = False
                self._since = time.monotonic()

    def expect_writer(self) -> None:
        """Announces that the next wait is for the chief, which writes a file meanwhile.

        The other processes call it where they know the chief writes (its
        `save`, `ModelCheckpoint`, a backup, an export), so that their wait is
        not taken for a frozen peer however long the write takes.
        """
        with self._lock:
            if self._waiting:
                self._for_writer = True
            else:
                self._writer_expected = True

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Marks a file write replicate knows of: it never counts against the limit."""
        with self._lock:
            self._writing += 1
        try:
            yield
        finally:
            with self._lock:
                self._writing -= 1
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
        """Runs the watchdog's thread for the duration of a `fit`, `evaluate` or write."""
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
                exempt = self._writing > 0 or (waiting and self._for_writer)
                fetches = {k: now - t for k, t in self._fetches.items()}
            stuck = [k for k, spent in fetches.items() if spent > self.limit]
            if stuck:
                self._end(f"loading data for {fetches[stuck[0]]:.0f} s", stuck[0])
            elif exempt:
                continue
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
