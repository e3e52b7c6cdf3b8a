"""The processes of a `fit` in lockstep: the same epoch and step, one agreed `stop_training`.

`Lockstep` is the last callback of a `fit` across processes. At each epoch's
start and end every process exchanges its position (`replicate.backends.
agreement`), and each training step carries a small token inside its own
collective: the epoch, the step and whether the process wants to stop. The
replicated model's train function runs each execution of steps inside it
(`with lockstep:`, calling `before` and `after`) in the main thread, not in
Keras' per-batch hooks: a callback with those makes every step wait for the
callbacks (it turns off Keras' asynchronous dispatch), which costs more than
the token itself. So:

- when a callback sets `model.stop_training = True` on one process (its own
  condition, `TerminateOnNaN`, `EarlyStopping` on per-process data), every
  process stops after the same step: at an epoch's end, after that epoch; in
  `on_train_batch_begin`, after that step; in `on_train_batch_end`, after the
  next step, whose token carries the wish;
- processes that ran different steps stop with an error naming each one's
  position, instead of waiting for each other;
- a step in which no process had a sample (every process's generator ran
  out) stops training everywhere, as Keras stops when its input runs out;
- where the chief writes (its `ModelCheckpoint`, a backup), the others know
  it, so that their watchdog does not take the wait for a frozen peer.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import keras

from replicate.backends.agreement import Position, fingerprint


class Progress:
    """Where a replicated model is: in a `fit` or not, its epoch, the epochs it trained.

    The positions processes exchange are read from here (`in evaluate after
    epoch 2`).
    """

    def __init__(self) -> None:
        self.fitting = False
        self.epoch = 0
        self.trained = 0
        self.lockstep: Lockstep | None = None  # the running fit's, across processes

    @contextlib.contextmanager
    def in_fit(self) -> Iterator[None]:
        """Marks a `fit`: inside it, `save` and export are the chief's alone."""
        before = self.fitting
        self.fitting = True
        try:
            yield
        finally:
            self.fitting = before
            self.lockstep = None  # also when fit ended with an error, before on_train_end


class ChiefWriters:
    """When the chief's `ModelCheckpoint`s write, as the other processes can tell.

    The other processes do not run `ModelCheckpoint` (only the chief writes),
    but they know its settings: `save_freq="epoch"` writes at every epoch's
    end, an integer every that many batches (counted as Keras counts them).

    Args:
        checkpoints: The `ModelCheckpoint`s the chief runs.
    """

    def __init__(self, checkpoints: Sequence[keras.callbacks.ModelCheckpoint] = ()) -> None:
        self.every_epoch = any(c.save_freq == "epoch" for c in checkpoints)
        self.frequencies = [c.save_freq for c in checkpoints if c.save_freq != "epoch"]
        self._since = [0] * len(self.frequencies)
        self._last: int | None = None

    def at_batch_end(self, batch: int) -> bool:
        """Whether a checkpoint is written after `batch` (call once per batch end)."""
        added = batch + 1 if self._last is None or batch <= self._last else batch - self._last
        self._last = batch
        writes = False
        for i, frequency in enumerate(self.frequencies):
            self._since[i] += added
            if self._since[i] >= frequency:
                self._since[i] = 0
                writes = True
        return writes


class Lockstep(keras.callbacks.Callback):
    """Keeps the processes of a `fit` at the same epoch and step, with one `stop_training`.

    Goes last in `fit`'s callbacks (`replicate.processes.prepare_fit` puts it
    there, as `CatchingLockstep` when another callback has a batch-end hook
    that may set `stop_training`), so that it sees what every other callback
    decided.

    Args:
        backend: The model's process backend.
        variables: The variables training changes (for the fingerprint).
        writers: When the chief writes checkpoints (`ChiefWriters`); empty on
            the chief itself.
    """

    def __init__(self, backend: Any, variables: Sequence[Any], writers: ChiefWriters) -> None:
        super().__init__()
        self.backend = backend
        self.agreement = backend.agreement
        self.mark = fingerprint(variables)
        self.writers = writers
        self.epoch = 0
        self.step = 0
        self.wish = False  # this process wants to stop, and the others do not know yet
        self.sent = False  # the wish the steps carry
        self.agreed = False  # every process stops after this step
        self.returned: Any = None  # the token the last steps returned with their logs

    @property
    def progress(self) -> Progress:
        return self.model.progress

    def on_train_begin(self, logs: Any = None) -> None:
        self.agreement.arm()
        self.wish = self.sent = self.agreed = False
        self.progress.lockstep = self

    def on_train_end(self, logs: Any = None) -> None:
        self.progress.lockstep = None

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.epoch = self.progress.epoch = epoch
        self.step = 0
        self.agreement.meet(Position("epoch", epoch))
        self.agreement.start_epoch(epoch, self.mark, self.wish)
        self.sent = self.wish

    def before(self) -> None:
        """Before an execution of steps: a wish to stop set since goes with them."""
        if self.model.stop_training and not self.agreed:
            self.model.stop_training = False  # set in on_train_batch_begin
            self.wish = True
        if self.wish != self.sent:
            self.agreement.want_stop(self.wish)
            self.sent = self.wish

    def __enter__(self) -> Lockstep:
        self.before()
        return self

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        if kind is None:  # outside the step's wait: `expect_writer` is for the next one
            self.after(self.model.steps_per_execution)

    def after(self, steps: int, ran: bool = True) -> None:
        """After an execution of `steps` steps (`ran=False`: skipped, resuming a backup)."""
        end = self.step + steps - 1
        self.step += steps
        if self.writers.frequencies and self.writers.at_batch_end(end):
            self.backend.watchdog.expect_writer()  # the chief writes before the next step
        if not ran:
            return
        returned, self.returned = self.returned, None
        seen = self.agreement.after_steps(end, self.wish, returned)
        if not any(self.agreement.samples(seen)):
            warnings.warn(
                f"replicate: every process's input ran out of data at step {end + 1} of "
                f"epoch {self.epoch + 1}; interrupting training on every process, as Keras "
                "does when its input runs out. With `steps_per_epoch`, give the process with "
                "the most data at least `steps_per_epoch * epochs` batches (`.repeat()`).",
                stacklevel=2,
            )
            self.agreed = True
        elif self.agreement.stop_wanted(seen):
            self.agreed = True  # every process, after this same step
        if self.agreed:
            self.model.stop_training = True
            self.wish = False

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if self.writers.every_epoch:
            self.backend.watchdog.expect_writer()  # the chief's checkpoint, just before
        wish = self.wish or bool(self.model.stop_training)
        outcome = self.agreement.meet(Position("epoch_end", epoch), stop=wish)
        self.model.stop_training = outcome.stop
        self.wish = self.agreed = False
        self.progress.trained = epoch + 1


class CatchingLockstep(Lockstep):
    """`Lockstep` with a batch-end hook, for `fit`s where another callback has one.

    Keras stops right after the batch-end hooks when `stop_training` is set;
    a wish that only this process has must wait for the next step to reach
    the others, so the hook takes it back and the next step carries it.
    """

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if self.model.stop_training and not self.agreed:
            self.model.stop_training = False
            self.wish = True


def has_batch_end_hook(callback: keras.callbacks.Callback) -> bool:
    """Whether `callback` overrides Keras' batch-end hooks (and may set `stop_training` there)."""
    base = keras.callbacks.Callback
    return any(
        getattr(type(callback), name, None) is not getattr(base, name)
        for name in ("on_train_batch_end", "on_batch_end")
    )
