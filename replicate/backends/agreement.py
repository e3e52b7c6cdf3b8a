"""Where each process is: a small token exchanged at every collective phase.

Processes that make different collective calls wait for each other for ever
(or, under Horovod, sum tensors that do not belong together). So before each
phase that communicates (the start of `fit`, a broadcast, each epoch's start
and end, `evaluate`, `save`, an export) every process sends its position: the
phase, the epoch, the step and a fingerprint of the variables involved (their
count, shapes and dtypes, not their values). When the positions differ, every
process stops at once with the same error, naming each one's position
(`process 1 is in evaluate after epoch 2; process 0 is in fit, epoch 3, before
step 1`); when only the variables differ, the error names the first variable
that differs on each process.

Each training step carries its token inside the step's own collective (no
extra message, and nothing written before the step: the step counts itself):
the epoch, the step, whether the process wants to stop (`model.stop_training`)
and how many samples it had. `replicate.lockstep` reads it after the step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

PHASES = (
    "fit",
    "broadcast",
    "epoch",
    "step",
    "epoch_end",
    "validation",
    "evaluate",
    "save",
    "save_weights",
    "export",
    "written",
    "fit_end",
)
# An eager token: present, phase, epoch, step, fingerprint, flags, value.
_WIDTH = 7
STOP, FAILED = 1, 2  # flags
_TEXT = 240  # bytes of a variable's description in a disagreement
# A step's token (float32, inside the step's collective): present, epoch, serial
# (the process's count of step collectives, kept in-graph), fingerprint, stop, the
# serial at the epoch's start, samples. Every value stays below 2**24, exact in float32.
STEP_WIDTH = 7
_PRESENT, _EPOCH, _SERIAL, _PRINT, _STOP, _BASE, _SAMPLES = range(STEP_WIDTH)
_EXACT = 1 << 24


class DisagreementError(RuntimeError):
    """The processes of a job are at different points, or hold different variables."""


@dataclass(frozen=True)
class Position:
    """Where a process is.

    Args:
        phase: One of `PHASES`.
        epoch: In `fit`, the epoch (from 0); elsewhere, the epochs the model
            has trained so far.
        step: In `fit`, the step of the epoch (from 0); else -1.
    """

    phase: str
    epoch: int = -1
    step: int = -1

    def code(self) -> int:
        return PHASES.index(self.phase) + 1

    def describe(self) -> str:
        """The position in words, as the disagreement error shows it."""
        e, s, after = self.epoch, self.step, _after(self.epoch)
        return {
            "fit": f"at the start of fit (epoch {e + 1})",
            "broadcast": "broadcasting the chief's variables",
            "epoch": f"in fit, epoch {e + 1}, before step 1",
            "step": f"in fit, epoch {e + 1}, step {s + 1}",
            "epoch_end": f"in fit, at the end of epoch {e + 1}",
            "validation": f"in fit's validation after epoch {e + 1}",
            "evaluate": f"in evaluate {after}",
            "save": f"in save {after}",
            "save_weights": f"in save_weights {after}",
            "export": f"in export {after}",
            "written": "waiting for the chief to finish writing",
            "fit_end": f"at the end of fit {after}",
        }[self.phase]


def _after(epochs: int) -> str:
    return f"after epoch {epochs}" if epochs > 0 else "before any training epoch"


def _decode(row: np.ndarray) -> Position:
    return Position(PHASES[int(row[1]) - 1], int(row[2]), int(row[3]))


def _code(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 1


def describe_variable(variable: Any) -> str:
    """`path` (shape) dtype, as a disagreement names a variable."""
    name = getattr(variable, "path", None) or getattr(variable, "name", "?")
    shape = tuple(int(d) if d is not None else None for d in variable.shape)
    return f"`{name}` {shape} {tf.as_dtype(variable.dtype).name}"


def _signature(variable: Any) -> str:
    return f"{tuple(variable.shape)}:{tf.as_dtype(variable.dtype).name}"


def fingerprint(variables: Sequence[Any]) -> int:
    """A 24-bit fingerprint of the variables' count, order, shapes and dtypes (not names)."""
    text = "|".join(_signature(v) for v in variables)
    return _code(f"{len(variables)}|{text}") % (_EXACT - 1) + 1


@dataclass
class Outcome:
    """What a meeting agreed: whether any process wants to stop, which failed, their values."""

    stop: bool
    failed: list[int]
    values: list[int]


class Agreement:
    """The tokens of one process; `backend.agreement` makes it.

    Args:
        backend: The process backend; its `gather_rows` is the channel every
            token takes, apart from any other collective.
    """

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.rank, self.size = backend.rank, backend.size  # Horovod's cost a call each
        self._received: tf.Tensor | None = None
        self._sent: tf.Variable | None = None
        self._seen: tf.Variable | None = None
        self._count: tf.Variable | None = None
        self._serial = 0.0
        self._epoch, self._mark = 0, 0

    # -- at a phase: an eager meeting -----------------------------------------

    def meet(
        self,
        position: Position,
        *,
        variables: Sequence[Any] | None = None,
        stop: bool = False,
        failed: bool = False,
        value: int = 0,
    ) -> Outcome:
        """Exchanges this process's position with every other process's.

        Args:
            position: Where this process is.
            variables: The variables the phase involves; their fingerprint
                must agree too.
            stop: This process wants training to stop (any process's wish
                stops all).
            failed: This process failed at what the phase did (a chief's write).
            value: A number to share (the chief's export version).

        Returns:
            The `Outcome` every process sees.

        Raises:
            DisagreementError: On every process, if any position or
                fingerprint differs; the message names each one's position,
                or the first variable that differs on each.
        """
        size = self.size
        if size == 1:
            return Outcome(stop, [0] if failed else [], [value])
        mark = fingerprint(variables) if variables is not None else 0
        flags = (STOP if stop else 0) | (FAILED if failed else 0)
        row = [1, position.code(), position.epoch, position.step, mark, flags, value]
        table = self.backend.gather_rows(np.asarray(row, np.int64))
        if (table[:, 1:4] != table[0, 1:4]).any():
            raise DisagreementError(self._positions_message([_decode(r) for r in table]))
        if (table[:, 4] != table[0, 4]).any():
            self._variables_differ(list(variables or []), position)
        return Outcome(
            stop=bool((table[:, 5] & STOP).any()),
            failed=[r for r in range(size) if table[r, 5] & FAILED],
            values=[int(v) for v in table[:, 6]],
        )

    def _positions_message(self, positions: list[Position]) -> str:
        where = "; ".join(f"process {r} is {p.describe()}" for r, p in enumerate(positions))
        return (
            f"replicate: the processes of this job are not at the same point: {where}. "
            "Every process must make the same calls in the same order (fit, evaluate, "
            "save, save_weights, export, with the same epochs and steps); one that skips a "
            "call or runs an extra one (`if rank == 0: parallel.evaluate(...)`) leaves "
            "the others waiting. For work on one process alone, use `parallel.template` "
            "(its evaluate, predict and save run on that process only)."
        )

    def _variables_differ(self, variables: list[Any], position: Position) -> None:
        """Finds the first variable that differs, names it on every process, raises."""
        counts = self.backend.gather_rows(np.asarray([len(variables)], np.int64))[:, 0]
        width = int(counts.max())
        codes = np.zeros(width, np.int64)
        codes[: len(variables)] = [_code(_signature(v)) for v in variables]
        table = self.backend.gather_rows(codes)
        differing = np.nonzero((table != table[0]).any(axis=0))[0]
        first = int(differing[0]) if len(differing) else width - 1
        mine = (
            describe_variable(variables[first])
            if first < len(variables)
            else f"no such variable (it has {len(variables)})"
        )
        raw = np.zeros(_TEXT, np.int64)
        encoded = mine.encode()[:_TEXT]
        raw[: len(encoded)] = list(encoded)
        texts = self.backend.gather_rows(raw)
        named = [bytes(int(b) for b in row if b).decode(errors="replace") for row in texts]
        each = "; ".join(
            f"{text} on process {r} ({counts[r]} variables)" for r, text in enumerate(named)
        )
        raise DisagreementError(
            f"replicate: the processes hold different variables {position.describe()}, so "
            f"they cannot be kept identical: variable {first + 1} is {each}. Every process "
            "must build the same model (the same layers in the same order, the same "
            "optimizer); variable names may differ between processes, their order, shapes "
            "and dtypes may not."
        )

    def check_variables(self, variables: Sequence[Any]) -> None:
        """Agrees on the count, shapes and dtypes of `variables` before a broadcast."""
        self.meet(Position("broadcast"), variables=variables)

    # -- inside a training step ------------------------------------------------

    def arm(self) -> None:
        """Creates the variables a step's token lives in (eagerly, before any step is traced)."""
        if self._sent is None and self.size > 1:
            with tf.init_scope(), tf.device("/cpu:0"):
                shape = (self.size, STEP_WIDTH)
                self._sent = tf.Variable(tf.zeros(shape), trainable=False, name="replicate_sent")
                self._seen = tf.Variable(tf.zeros(shape), trainable=False, name="replicate_seen")
                self._count = tf.Variable(
                    0, dtype=tf.int64, trainable=False, name="replicate_count"
                )

    def step_payload(self, samples: Any) -> tf.Tensor | None:
        """The token a traced step adds to its collective, or None (eager, or not armed).

        Each call counts one step collective on this process (in-graph), so that
        nothing needs writing before a step.
        """
        if self._sent is None or tf.executing_eagerly():
            return None
        size, rank = self.size, self.rank
        serial = tf.cast(tf.math.floormod(self._count.assign_add(1), _EXACT - 1) + 1, tf.float32)
        mine = tf.one_hot(rank, size)[:, None]
        token = (
            self._sent.read_value()
            + mine * tf.one_hot(_SERIAL, STEP_WIDTH)[None, :] * serial
            + mine * tf.one_hot(_SAMPLES, STEP_WIDTH)[None, :] * tf.cast(samples, tf.float32)
        )
        return tf.reshape(token, [-1])

    def step_received(self, summed: tf.Tensor) -> None:
        """Keeps every process's token, summed out of the step's collective.

        It is kept in a variable, and also handed to `take_received`, so that a
        step can return it with its logs (reading a tensor the step returned
        costs far less, after every step, than reading a variable).
        """
        table = tf.reshape(summed, (self.size, STEP_WIDTH))
        self._seen.assign(table)
        self._received = table

    def take_received(self) -> tf.Tensor | None:
        """The token table the step being traced received (once), or None."""
        received, self._received = self._received, None
        return received

    def start_epoch(self, epoch: int, mark: int, stop: bool = False) -> None:
        """Sets this process's token for the epoch's steps (eager; once per epoch)."""
        table = np.zeros((self.size, STEP_WIDTH), np.float32)
        base = int(self._count.numpy()) % (_EXACT - 1)
        table[self.rank, [_PRESENT, _EPOCH, _PRINT, _STOP, _BASE]] = [
            1,
            epoch % _EXACT,
            mark,
            float(stop),
            base,
        ]
        self._sent.assign(table)
        self._epoch, self._mark = epoch, mark

    def want_stop(self, stop: bool) -> None:
        """Changes the stop wish the next steps carry (eager; only when it changes)."""
        self._sent.assign(
            tf.tensor_scatter_nd_update(self._sent, [[self.rank, _STOP]], [float(stop)])
        )

    def after_steps(self, step: int, stop: bool, returned: Any = None) -> np.ndarray:
        """Every process's token for the steps just run: `(processes, STEP_WIDTH)`.

        Read from the steps' own collective; steps that carried none (run
        eagerly, or a model's own `train_step` without an optimizer call) are
        followed by an eager meeting instead.

        Args:
            step: This process's step in the epoch (for the eager meeting).
            stop: Whether this process asked to stop (for the eager meeting).
            returned: The token table the steps returned with their logs, if
                they did (else it is read from where the step kept it).

        Raises:
            DisagreementError: When the processes ran different steps.
        """
        seen = np.asarray(returned) if returned is not None else self._seen.numpy()
        rank = self.rank
        if seen[rank, _SERIAL] == self._serial or seen[rank, _PRESENT] != 1:
            row = [1, self._epoch % _EXACT, step % _EXACT, self._mark, stop, 0, -1]
            seen = self.backend.gather_rows(np.asarray(row, np.int64)).astype(np.float32)
            steps = seen[:, _SERIAL]
        else:
            self._serial = seen[rank, _SERIAL]
            steps = seen[:, _SERIAL] - seen[:, _BASE] - 1
        keys = seen[:, [_PRESENT, _EPOCH, _SERIAL, _PRINT]]
        if (keys != keys[rank]).any():
            positions = [Position("step", int(e), int(s)) for e, s in zip(seen[:, _EPOCH], steps)]
            message = self._positions_message(positions)
            if (seen[:, _PRINT] != seen[rank, _PRINT]).any():
                message += " (Their models' variables differ too.)"
            raise DisagreementError(message)
        return seen

    @staticmethod
    def stop_wanted(seen: np.ndarray) -> bool:
        """Whether any process asked to stop in the tokens of a step."""
        return bool(seen[:, _STOP].any())

    @staticmethod
    def samples(seen: np.ndarray) -> list[int]:
        """Each process's samples in the step (-1 where the step did not say)."""
        return [int(v) for v in seen[:, _SAMPLES]]
