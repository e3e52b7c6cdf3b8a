"""Backend: how the processes of one training job talk to each other.

Everything that does not depend on the engine lives here, once: summing
gradients (with optional float16 compression), count-weighted averages,
combining metric state, broadcasting, step agreement and the wording of a
lost process. A multi-process backend implements four calls of its engine:
`_all_sum`, `_all_max`, `_broadcast` and `_is_lost_peer`, and may give the
agreement tokens (`replicate.backends.agreement`) a channel of their own
(`_agreement_sum`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from replicate.backends.agreement import Agreement
from replicate.watchdog import DEFAULT_HANG_TIMEOUT, Watchdog

COMPRESSIONS = ("none", "fp16")


class Backend:
    """Collectives across processes; one process makes every collective the identity.

    A backend sees tensors only after the towers of its own process have
    been combined, so it never knows about towers.

    Args:
        compression: `"fp16"` sends floating-point gradients as float16
            (half the traffic) and casts them back; `"none"` or `None` sends
            them as they are.
        hang_timeout: Seconds a process may spend outside the collective
            steps (callbacks, data loading) while the others wait, before it
            is stopped so that the job ends instead of hanging
            (`replicate.watchdog.Watchdog`; the chief's known writes and the
            waits for them never count). Defaults to the
            `REPLICATE_HANG_TIMEOUT` environment variable, else 1800 (30
            minutes, torch.distributed's default collective timeout); 0 turns
            it off.
        lockstep: Each training step carries its agreement token
            (`replicate.lockstep`): `stop_training` on one process stops
            every process, and processes that ran different steps stop with
            an error. `False` leaves the steps as they were before (only the
            phases agree): for measuring the token's cost. Defaults to True.

    Raises:
        ValueError: For an unknown compression or a negative `hang_timeout`.
    """

    name: str = "base"
    launcher: str = "launcher"
    # Whether TensorFlow's collectives form groups over every process's devices (the
    # collective runtime): a synchronized layer's towers then meet over the job in one
    # collective inside the graph (`replicate.meeting`).
    collectives_span_job: bool = False

    def __init__(
        self,
        *,
        compression: str | None = None,
        hang_timeout: float | None = None,
        lockstep: bool = True,
    ) -> None:
        choice = "none" if compression is None else compression
        if choice not in COMPRESSIONS:
            raise ValueError(
                f"Unknown gradient compression. Received: compression={compression!r}. "
                f"Choose one of {list(COMPRESSIONS)}."
            )
        self.compression = choice
        if hang_timeout is None:
            hang_timeout = float(os.environ.get("REPLICATE_HANG_TIMEOUT", DEFAULT_HANG_TIMEOUT))
        if hang_timeout < 0:
            raise ValueError(
                "`hang_timeout` must be >= 0 seconds (0 turns the watchdog off). "
                f"Received: hang_timeout={hang_timeout!r}"
            )
        self.hang_timeout = float(hang_timeout)
        self.lockstep = bool(lockstep)
        self._watchdog = None
        self._agreement = None

    @property
    def watchdog(self) -> Watchdog:
        """This process's `replicate.watchdog.Watchdog`."""
        if self._watchdog is None:
            self._watchdog = Watchdog(self.rank, self.size, self.hang_timeout)
        return self._watchdog

    @property
    def agreement(self) -> Agreement:
        """This process's `replicate.backends.agreement.Agreement` (its position tokens)."""
        if self._agreement is None:
            self._agreement = Agreement(self)
        return self._agreement

    # -- identity ------------------------------------------------------------

    @property
    def rank(self) -> int:
        """This process's index, 0 to `size - 1`."""
        return 0

    @property
    def size(self) -> int:
        """The number of processes."""
        return 1

    @property
    def local_rank(self) -> int:
        """This process's index among the processes of its machine."""
        return 0

    @property
    def local_size(self) -> int:
        """The number of processes on this machine."""
        return 1

    @property
    def is_chief(self) -> bool:
        """Whether this process writes checkpoints, logs and progress bars."""
        return self.rank == 0

    # -- the engine's calls (multi-process backends implement them) -------------

    def _all_sum(self, tensors: list[tf.Tensor]) -> list[tf.Tensor]:
        """The element-wise sum of each tensor over processes: one grouped call
        for tensors of one dtype."""
        raise NotImplementedError

    def _all_max(self, value: tf.Tensor) -> tf.Tensor:
        """The maximum of an int64 scalar over processes."""
        raise NotImplementedError

    def _broadcast(self, variables: list[tf.Variable], root_rank: int) -> None:
        """Assigns every variable its value on `root_rank`, matched by position."""
        values = [tf.convert_to_tensor(v) for v in variables]
        mine = self.rank == root_rank
        sent = [v if mine else tf.zeros_like(v) for v in values]
        for variable, value in zip(variables, self.all_sum(sent)):
            variable.assign(value)

    def _agreement_sum(self, table: tf.Tensor) -> tf.Tensor:
        """The sum of an agreement token's table over processes, eagerly.

        Engines whose collectives meet by a counter (the collective runtime's
        instance keys) give tokens a counter of their own, so that a token
        always meets the other processes' tokens, whatever else they did.
        """
        return self._all_sum([table])[0]

    def _is_lost_peer(self, error: BaseException) -> bool:
        """Whether `error` means another process died or stopped answering."""
        return False

    def _lost_peer_detail(self, error: BaseException) -> str:
        """What `error` tells about the lost process."""
        return "a peer died or stopped answering"

    def _lost_peer_hint(self) -> str:
        """What the launcher's log tells about the process that failed."""
        return ""

    # -- shared ----------------------------------------------------------------

    def all_sum(
        self, tensors: Sequence[tf.Tensor], *, compress: bool | Sequence[bool] = False
    ) -> list[tf.Tensor]:
        """Sums each tensor over processes (one grouped call).

        Args:
            tensors: What to sum.
            compress: Send float32 tensors as float16 (all, or per tensor).
        """
        tensors = [tf.convert_to_tensor(t) for t in tensors]
        if self.size == 1 or not tensors:
            return tensors
        flags = [compress] * len(tensors) if isinstance(compress, bool) else list(compress)
        sent = [
            tf.cast(t, tf.float16) if flag and t.dtype == tf.float32 else t
            for t, flag in zip(tensors, flags, strict=True)
        ]
        summed: list[Any] = [None] * len(sent)
        by_dtype: dict[tf.DType, list[int]] = {}
        for i, t in enumerate(sent):
            by_dtype.setdefault(t.dtype, []).append(i)
        with self._collective():
            for indices in by_dtype.values():
                for i, t in zip(indices, self._all_sum([sent[i] for i in indices])):
                    summed[i] = t
        return [tf.cast(s, t.dtype) for s, t in zip(summed, tensors)]

    def _collective(self):
        """Marks an eager collective for the watchdog (this process waits for the others)."""
        if tf.executing_eagerly():
            return self.watchdog.waiting()
        return contextlib.nullcontext()

    def tower_sum(self, value: tf.Tensor, name: str) -> tf.Tensor:
        """The sum of `value` over the job's processes, as an op of the function being
        traced, in a tower's copy of a function that every tower of this process calls
        (`replicate.meeting`: a synchronized layer's sums, where the backend's
        collectives do not span the job). `name` is the same in every process and
        unique in the function: the all-reduce's place in it.

        Raises:
            NotImplementedError: Where the backend has none.
        """
        raise NotImplementedError(f"The {self.name} backend sums no tensor per tower.")

    def gather_rows(self, row: np.ndarray) -> np.ndarray:
        """Every process's `row` (int64, the same length everywhere), eagerly.

        Returns:
            An array of shape `(size, len(row))`: row r is process r's.
        """
        table = np.zeros((self.size, len(row)), np.int64)
        table[self.rank] = row
        if self.size == 1:
            return table
        with self._collective():
            return np.asarray(self._agreement_sum(tf.constant(table)))

    def _with_token(self, payload: list[Any], samples: Any) -> tuple[list[Any], bool]:
        """`payload` with the step's agreement token at its end, when tracing a step."""
        token = self.agreement.step_payload(samples)
        return (payload, False) if token is None else ([*payload, token], True)

    def sum_gradients(self, grads: Sequence[Any]) -> list[Any]:
        """Sums gradients over processes (`None` stays `None`; sparse ones are sent dense)."""
        if self.size == 1:
            return list(grads)
        present = [i for i, g in enumerate(grads) if g is not None]
        dense = [tf.convert_to_tensor(grads[i]) for i in present]
        payload, token = self._with_token(dense, -1)
        fp16 = self.compression == "fp16"
        summed = self.all_sum(payload, compress=[fp16] * len(dense) + [False] * token)
        if token:
            self.agreement.step_received(summed.pop())
        out: list[Any] = [None] * len(grads)
        for i, g in zip(present, summed):
            out[i] = g
        return out

    def exchange(
        self,
        count: tf.Tensor,
        grads: Sequence[Any] = (),
        state: Sequence[tf.Tensor] = (),
        aggregations: Sequence[str] = (),
        scalars: Sequence[tf.Tensor] = (),
        *,
        shares: bool = False,
    ) -> tuple[list[Any], list[tf.Tensor], list[tf.Tensor]]:
        """Everything one step sends to the other processes, in one collective.

        Args:
            count: This process's number of samples in the step.
            grads: This process's gradients: the mean over its samples, or with
                `shares=True` already its share of the global gradient.
            state: Metric state, combined by `aggregations` ("sum" adds,
                otherwise averaged over processes).
            scalars: Means over this process's samples (a step's own values).

        Returns:
            `(grads, state, scalars)`: the global gradient (the mean over every
            process's samples), the combined state, and each scalar's mean over
            every process's samples.
        """
        if self.size == 1:
            return list(grads), list(state), list(scalars)
        c = tf.cast(count, tf.float32)
        present = [i for i, g in enumerate(grads) if g is not None]
        dense = [tf.convert_to_tensor(grads[i]) for i in present]
        if not shares:
            dense = [g * tf.cast(c, g.dtype) for g in dense]
        weighted = [v * tf.cast(c, v.dtype) for v in scalars]
        payload, token = self._with_token([*dense, c, *state, *weighted], count)
        compress = [self.compression == "fp16"] * len(dense) + [False] * (len(payload) - len(dense))
        summed = self.all_sum(payload, compress=compress)
        if token:
            self.agreement.step_received(summed.pop())
        n = len(dense)
        total = summed[n]
        out: list[Any] = [None] * len(grads)
        for i, g in zip(present, summed[:n]):
            out[i] = g if shares else tf.math.divide_no_nan(g, tf.cast(total, g.dtype))
        combined = [
            v if a == "sum" else v / tf.cast(self.size, v.dtype)
            for v, a in zip(summed[n + 1 : n + 1 + len(state)], aggregations, strict=True)
        ]
        means = [
            tf.math.divide_no_nan(v, tf.cast(total, v.dtype)) for v in summed[n + 1 + len(state) :]
        ]
        return out, combined, means

    def share(self, count: tf.Tensor) -> tf.Tensor:
        """This process's `count` of samples divided by every process's (float32)."""
        count = tf.cast(count, tf.float32)
        return tf.math.divide_no_nan(count, self.all_sum([count])[0])

    def reduce_state(self, values: Sequence[Any], aggregations: Sequence[str]) -> list[Any]:
        """Combines metric state over processes: summed where `aggregation` is "sum",
        else averaged, so that a metric's result covers every process's samples."""
        if self.size == 1 or not values:
            return list(values)
        summed = self.all_sum(values)
        return [
            s if a == "sum" else s / tf.cast(self.size, s.dtype)
            for s, a in zip(summed, aggregations, strict=True)
        ]

    def reduce_max(self, value: Any) -> Any:
        """The maximum of an integer scalar over processes."""
        if self.size == 1:
            return value
        with self._collective():
            return self._all_max(tf.cast(value, tf.int64))

    def broadcast_variables(self, variables: Sequence[Any], root_rank: int = 0) -> None:
        """Gives `variables` (Keras or TF) on every process their values on `root_rank`.

        Variables are matched by their position in `variables`, never by
        name: a model loaded from a file on the chief (`hidden/kernel`) and
        the same model built afresh elsewhere (`mlp/hidden/kernel`) agree.
        First the processes agree on the count, shapes and dtypes.

        Raises:
            replicate.backends.agreement.DisagreementError: On every process,
                naming the first variable that differs on each, if the count,
                a shape or a dtype differs.
        """
        if self.size == 1:
            return
        self.agreement.check_variables(variables)
        if not variables:
            return
        with self._collective():
            self._broadcast([getattr(v, "value", v) for v in variables], root_rank)

    def barrier(self) -> None:
        """Waits until every process has reached this point."""
        if self.size > 1:
            self.all_sum([tf.zeros((1,))])

    def describe_failure(self, error: BaseException) -> str | None:
        """A message if `error` means another process was lost, else `None`."""
        if self.size == 1 or not self._is_lost_peer(error):
            return None
        return (
            f"replicate: process {self.rank} of {self.size} lost the other processes of "
            f"this {self.launcher} job: {self._lost_peer_detail(error)}. "
            f"{self._lost_peer_hint()}"
        ).strip()
