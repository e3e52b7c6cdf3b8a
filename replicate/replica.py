"""Towers that meet in the middle of a step: a replica context for each tower.

How a step flows. `TowerGroup.run(fn)` calls `fn(i)` once per tower, under
`tf.device(devices[i])`, `tf.name_scope(f"tower_{i}")` and a `TowerContext`,
which is what the tower's code sees as `tf.distribute.get_replica_context()`.
Where the towers need nothing from each other (a plain model's forward or
backward pass), they run one after another in the caller's thread. So they
do where a synchronized layer's sums are their only meetings and the step is
traced, in one process or in a job whose processes hold as many towers: the
sums are then collectives inside the one traced forward function
(`replicate.meeting`). Otherwise (eagerly, uneven towers per process under the
collective backend, a model's own `train_step`) each tower runs in a thread of
its own, and the threads meet:

- at `all_reduce` (what Keras' `BatchNormalization(synchronized=True)` calls
  on its batch sums): every tower hands its value, the sum over the towers
  (and over processes, through the backend) is formed once on the variable
  device, and every tower continues with it; its gradient meets the same way
  in the backward pass, so the statistics are those of the global batch;
- at `TowerContext.meet` (what `replicate.steps` calls at each
  `optimizer.apply` of a model's own `train_step`): the towers' values are
  combined once and the towers continue with the result.

The threads run in lockstep, one at a time, in tower order: tower 0 until it
reaches a meeting (or ends), then tower 1, ..., then the meeting's merge runs
in the caller's thread, then tower 0 again. So the ops are built in the same
order on every call and in every process (collectives match by name and
order), and tracing never races. Under `tf.function` the threads only trace:
the graph they build is what runs, so threads cost nothing per step.

Why threads rather than running a functional model layer by layer over the
towers: a model's own `train_step` is arbitrary Python (two optimizers, loops,
sub-models called in any order), and only a thread can pause it in the middle
of a call and resume it. TensorFlow's `MirroredStrategy` meets its replicas the
same way; this module keeps to what replicate needs and leaves every variable
where it is.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from replicate import _keras_compat, meeting, reduce

Merge = Callable[[list[Any]], list[Any]]


class _Aborted(Exception):
    """Unwinds a tower thread when another tower failed."""


class TowerContext(tf.distribute.ReplicaContext):
    """The replica context of one tower.

    `num_replicas_in_sync` stays 1, so Keras does not rescale losses by the
    number of replicas: replicate weights towers by their slice of the batch
    itself.
    """

    def __init__(self, group: TowerGroup, index: int, thread: _TowerThread | None = None) -> None:
        super().__init__(tf.distribute.get_strategy(), replica_id_in_sync_group=index)
        self.group = group
        self.index = index
        self._thread = thread

    @property
    def device(self) -> str:
        """This tower's device."""
        return self.group.devices[self.index]

    def meet(self, kind: str, value: Any, merge: Merge) -> Any:
        """Hands `value` to the other towers and returns this tower's part of `merge`.

        Every tower must call `meet` with the same `kind`, in the same order.
        `merge` runs once, in the caller's thread, with the towers' values in
        tower order, and returns one result per tower.

        Raises:
            RuntimeError: If the towers run one after another (nothing to
                meet), or they disagree on their meetings.
        """
        if self._thread is None:
            raise RuntimeError(
                f"A tower asked to meet the others ({kind}), but this step runs its towers "
                "one after another. replicate meets towers for "
                "layers with `synchronized = True` (BatchNormalization(synchronized=True)) "
                "and for models with their own `train_step`/`test_step`. A custom layer "
                "that calls `tf.distribute.get_replica_context().all_reduce` must set the "
                "attribute `synchronized = True`."
            )
        return self._thread.wait_at(kind, value, merge)

    def all_reduce(self, reduce_op: Any, value: Any, options: Any = None) -> Any:
        """Sums (or averages) `value` over every tower of every process.

        Differentiable: the gradient meets the towers the same way, so a loss
        that depends on the total trains every tower's contribution.
        """
        del options
        op = tf.distribute.ReduceOp(reduce_op.upper()) if isinstance(reduce_op, str) else reduce_op
        if self.group.in_graph:
            in_graph = meeting.active()
            if in_graph is None:
                raise RuntimeError(
                    "`all_reduce` was called in a replicate tower outside the model's "
                    "forward pass. Inside a step, replicate meets the towers for a "
                    "synchronized layer's statistics only, while the model is called."
                )
            return in_graph.all_reduce(op, value)
        flat = [tf.convert_to_tensor(v) for v in tf.nest.flatten(value)]
        group = self.group

        @tf.custom_gradient
        def reduced(*values):
            total = self.meet("all_reduce", list(values), group.sum_over_towers)
            if op == tf.distribute.ReduceOp.MEAN:
                total = [t / tf.cast(group.global_towers(), t.dtype) for t in total]

            def grad(*upstream):
                # The backward pass runs later, in the towers of that pass.
                context = tf.distribute.get_replica_context()
                if not isinstance(context, TowerContext):
                    raise RuntimeError(
                        "The gradient of a synchronized layer's all_reduce must be taken "
                        "inside replicate's towers (ReplicaBuilder.compute_gradients or "
                        "fit), not outside them."
                    )
                back = context.meet(
                    "all_reduce_gradient", list(upstream), context.group.sum_gradients
                )
                if op == tf.distribute.ReduceOp.MEAN:
                    back = [b / tf.cast(context.group.global_towers(), b.dtype) for b in back]
                return back

            return total, grad

        return tf.nest.pack_sequence_as(value, list(reduced(*flat)))

    def merge_call(self, merge_fn: Any, args: Any = (), kwargs: Any = None) -> Any:
        raise RuntimeError(
            "`merge_call` is not available inside a replicate tower: a tower's code may call "
            "`tf.distribute.get_replica_context().all_reduce(...)`, and a model's own "
            "`train_step` may call `optimizer.apply(...)`/`apply_gradients(...)`, which "
            "replicate synchronizes itself."
        )

    def all_gather(self, value: Any, axis: int, options: Any = None) -> Any:
        raise RuntimeError(
            "`all_gather` is not available inside a replicate tower; use `all_reduce`."
        )


class _TowerThread(threading.Thread):
    """One tower's code, paused at each meeting until the caller resumes it."""

    def __init__(self, group: TowerGroup, index: int, fn: Callable[[int], Any], outer) -> None:
        super().__init__(daemon=True, name=f"replicate-tower-{index}")
        self.group, self.index, self.fn, self.outer = group, index, fn, outer
        self.resume = threading.Event()
        self.paused = threading.Event()
        self.meeting: tuple[str, Any, Merge] | None = None
        self.result: Any = None
        self.output: Any = None
        self.error: BaseException | None = None
        self.done = False
        self.abort = False

    def run(self) -> None:
        self.resume.wait()
        self.resume.clear()
        try:
            if self.abort:
                raise _Aborted
            with self.outer.enter(), self.group.scope(self.index, thread=self):
                self.output = self.fn(self.index)
        except _Aborted:
            pass
        except BaseException as error:  # handed to the caller's thread
            self.error = error
        finally:
            self.done = True
            self.paused.set()

    def wait_at(self, kind: str, value: Any, merge: Merge) -> Any:
        self.meeting = (kind, value, merge)
        self.paused.set()
        self.resume.wait()
        self.resume.clear()
        if self.abort:
            raise _Aborted
        result, self.result = self.result, None
        return result


class _OuterContext:
    """What a tower thread takes over from the caller: graph, name scope, Keras state."""

    # Keras keeps these per thread; a tower thread reads them as the caller set them.
    _KERAS_STATE = ("dtype_policy", "global_seed_generator", "global_random_seed")

    def __init__(self) -> None:
        self.eager = tf.executing_eagerly()
        self.graph = None if self.eager else tf.compat.v1.get_default_graph()
        self.name_scope = "" if self.graph is None else self.graph.get_name_scope()
        # tf.function's tracing installs variable creators per thread; a
        # tower thread must create (or refuse) variables as the caller does.
        self.creators = None if self.graph is None else _keras_compat.variable_creators(self.graph)
        self.keras = {name: _keras_compat.get_global_attribute(name) for name in self._KERAS_STATE}

    @contextlib.contextmanager
    def enter(self):
        for name, value in self.keras.items():
            if value is not None:
                _keras_compat.set_global_attribute(name, value)
        if self.graph is None:
            yield
            return
        with self.graph.as_default():
            _keras_compat.set_variable_creators(self.graph, self.creators)
            if self.name_scope:
                with self.graph.name_scope(self.name_scope + "/"):
                    yield
            else:
                yield


class TowerGroup:
    """Runs code once per tower, each tower on its device, with meetings between them.

    Args:
        devices: The towers' devices.
        variable_device: Where meetings combine values.
        backend: The process backend: meetings also sum over processes.
        present: `(towers,)` float, 1 where a tower holds real samples; a tower
            that only holds a stand-in row adds nothing to a meeting.
        gradient_weights: `None` when the towers' gradients are summed (they
            are shares of one loss). Otherwise each tower's gradient is
            weighted by this `(towers,)` share of the global batch before
            summing, and the gradient of an `all_reduce` is divided by it
            (see `sum_gradients`).
        threaded: Run each tower in a thread so that towers can meet.
        in_graph: The towers' meetings are collectives inside their one
            traced forward function (`replicate.meeting`), not threads.
    """

    def __init__(
        self,
        devices: Sequence[str],
        variable_device: str,
        *,
        backend: Any = None,
        present: tf.Tensor | None = None,
        gradient_weights: tf.Tensor | None = None,
        threaded: bool = False,
        in_graph: bool = False,
    ) -> None:
        if threaded and in_graph:
            raise ValueError("Towers meet either in threads or in the graph, not both.")
        self.devices = list(devices)
        self.variable_device = variable_device
        self.backend = backend
        self.present = present
        self.gradient_weights = gradient_weights
        self.threaded = threaded
        self.in_graph = in_graph

    @contextlib.contextmanager
    def scope(self, index: int, *, thread: _TowerThread | None = None):
        """Device, name scope and replica context of tower `index`."""
        context = TowerContext(self, index, thread)
        with tf.device(self.devices[index]), tf.name_scope(f"tower_{index}"), context:
            yield context

    def run(self, fn: Callable[[int], Any]) -> list[Any]:
        """`[fn(0), fn(1), ...]`, each under its tower's scope; threads if `threaded`."""
        if not self.threaded:
            outputs = []
            for i in range(len(self.devices)):
                with self.scope(i):
                    outputs.append(fn(i))
            return outputs
        return self._run_threads(fn)

    def _run_threads(self, fn: Callable[[int], Any]) -> list[Any]:
        outer = _OuterContext()
        threads = [_TowerThread(self, i, fn, outer) for i in range(len(self.devices))]
        for thread in threads:
            thread.start()
        try:
            while True:
                for thread in threads:
                    if thread.done:
                        continue
                    thread.resume.set()
                    thread.paused.wait()
                    thread.paused.clear()
                    if thread.error is not None:
                        raise thread.error
                if all(t.done for t in threads):
                    return [t.output for t in threads]
                self._merge(threads)
        finally:
            for thread in threads:
                if not thread.done:
                    thread.abort = True
                    thread.resume.set()
            for thread in threads:
                thread.join()

    def _merge(self, threads: list[_TowerThread]) -> None:
        kinds = [None if t.done else t.meeting[0] for t in threads]
        if len(set(kinds)) != 1:
            described = ", ".join(
                f"tower {t.index}: {'finished' if k is None else k}" for t, k in zip(threads, kinds)
            )
            raise RuntimeError(
                "The towers of one step must meet at the same points in the same order, "
                f"but they diverged ({described}). A model's own train_step must take the "
                "same path on every tower: the same optimizer calls and synchronized layers, "
                "whatever its slice of the batch holds."
            )
        merge = threads[0].meeting[2]
        with tf.device(self.variable_device):
            results = merge([t.meeting[1] for t in threads])
        for thread, result in zip(threads, results):
            thread.result = result
            thread.meeting = None

    # -- merges for all_reduce -------------------------------------------------

    def _mask(self, value: tf.Tensor, i: int) -> tf.Tensor:
        """`value`, or 0 where tower `i` holds only a stand-in row."""
        return value if self.present is None else reduce.scale(value, self.present[i])

    def _over_processes(self, values: list[tf.Tensor]) -> list[tf.Tensor]:
        if self.backend is None or self.backend.size == 1:
            return values
        return self.backend.all_sum(values)

    def _to_towers(self, values: list[tf.Tensor]) -> list[list[tf.Tensor]]:
        out = []
        for i, device in enumerate(self.devices):
            with tf.device(device):
                out.append([self._mask(tf.identity(v), i) for v in values])
        return out

    def global_towers(self) -> tf.Tensor:
        """The number of towers with real samples, over every process."""
        count = (
            tf.constant(float(len(self.devices)))
            if self.present is None
            else tf.reduce_sum(self.present)
        )
        return self._over_processes([count])[0]

    def sum_over_towers(self, per_tower: list[list[tf.Tensor]]) -> list[list[tf.Tensor]]:
        """The forward merge of `all_reduce`: the sum of every tower's value."""
        columns = list(zip(*per_tower))
        totals = [tf.add_n([self._mask(v, i) for i, v in enumerate(c)]) for c in columns]
        return self._to_towers(self._over_processes(totals))

    def sum_gradients(self, per_tower: list[list[tf.Tensor]]) -> list[list[tf.Tensor]]:
        """The backward merge of `all_reduce`.

        Towers whose gradients are summed get the sum of every tower's
        upstream gradient (the total fed every tower's loss). Towers whose
        gradients are later weighted by `w_j` get `sum_k(w_k up_k) / w_j`,
        so that after the weighting the sum is again exact.
        """
        weights = self.gradient_weights
        columns = list(zip(*per_tower))
        if weights is None:
            return self.sum_over_towers(per_tower)
        totals = [
            tf.add_n(
                [tf.math.multiply_no_nan(v, tf.cast(weights[i], v.dtype)) for i, v in enumerate(c)]
            )
            for c in columns
        ]
        totals = self._over_processes(totals)
        out = []
        for i, device in enumerate(self.devices):
            with tf.device(device):
                out.append([tf.math.divide_no_nan(t, tf.cast(weights[i], t.dtype)) for t in totals])
        return out
