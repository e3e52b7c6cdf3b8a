"""Towers that meet inside the graph: a synchronized layer traced once for every tower.

`BatchNormalization(synchronized=True)` sums its batch statistics over the
towers (`tf.distribute.get_replica_context().all_reduce`). Where that sum is
the towers' only meeting, and the step is traced by `tf.function` in one
process, each sum is a collective all-reduce inside the one traced forward
function: every tower calls that function under its own device scope, the
function is inlined there (its ops take the tower's device), and the inlined
copies of one all-reduce, which carry the same keys, form one collective over
the towers' devices. Its gradient is a second collective of the same kind. So
start-up traces the model once whatever the number of towers, as for a model
without synchronized layers.

Across processes, each sum still takes one traced function. Under the collective
backend (`replicate launch`), whose TensorFlow collective runtime spans the job,
it is one collective over every tower of every process: a group of towers x
processes devices, whose key every process computes alike. Under Horovod, each
tower's call sums its process's towers (the collective above), then all-reduces
that sum over the processes with Horovod's op; Horovod matches ops by their node
names, which the inlining prefixes with the calling tower's, alike in every
process, so tower k of each process meets tower k of the others. Both need as
many towers in every process (`Job`).

Elsewhere the towers meet in threads (`replicate.replica`): eagerly (each
collective would wait for towers that have not started), where the processes of
a collective job hold different numbers of towers, in a model's own
`train_step`, and in a process where a step whose towers met in the graph
failed (`abandon`).

Keys. A collective is named by a group key (the set of devices) and an
instance key (one all-reduce). The instance keys of one forward function are
counted in the order its all-reduces are traced, so that a second trace of the
same function (a last batch of another size) reuses the keys of the first and
the towers that call either trace still meet. A step that runs the towers'
forward pass twice (two views of a batch in a user's own `tf.function`) counts
its passes (`call_index`), and each pass has keys of its own, or the second
pass's all-reduces would meet the first's. Both ranges start far above the
keys TensorFlow's strategies and replicate's collective backend count from 1.

The all-reduce is the graph's `CollectiveReduce` op (TensorFlow's first
collective kernel, `tf.raw_ops.CollectiveReduce`), which meets logical CPU
devices of one process as well as GPUs.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from replicate import _keras_compat, cluster, reduce

_GROUP_BASE = 0x52500000
_GROUPS_PER_PROCESS = 0x1000
_JOB_BASE = 0x52400000
_INSTANCE_BASE = 0x52500000
_lock = threading.RLock()
_groups: dict[tuple[str, ...], int] = {}
_next_instance = _INSTANCE_BASE  # the instance key the next new all-reduce takes
_tracing = threading.local()
_calls: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_abandoned = False
_probes: dict[tuple[str, ...], Any] = {}


def usable(devices: Sequence[str]) -> bool:
    """Whether towers on `devices` may meet in the graph in this process.

    Not after `abandon`; and a probe, one all-reduce over `devices` run once
    per trace of a step, must complete: after a failed step, one of a user's
    own `tf.function` too, TensorFlow may keep the process's collectives
    aborted, and the probe then fails at once (and abandons).
    """
    if _abandoned:
        return False
    if len(devices) < 2:
        return True
    try:
        with tf.init_scope(), _lock:
            _probe(tuple(devices))
    except tf.errors.OpError:
        abandon()
        return False
    return True


def generation() -> int:
    """How many times the towers of this process stopped meeting in the graph (0 or 1):
    a step traced in another generation must be traced again."""
    return int(_abandoned)


def abandon() -> None:
    """Towers of this process meet in threads from now on, with a warning.

    Called when a step whose towers met in the graph failed (a tower's error,
    not the end of the data), or when the probe of `usable` failed: TensorFlow
    may then keep the process's local collectives aborted ("Collective ops is
    aborted by: ... Restart your program to reset"), and every later
    collective would fail.
    """
    global _abandoned
    if _abandoned:
        return
    _abandoned = True
    warnings.warn(
        "replicate: a step failed while the towers of a synchronized layer met inside the "
        "graph. TensorFlow may keep this process's collectives aborted after such a failure, "
        "so from now on the towers meet in threads: later steps are traced again, once per "
        "tower. A `tf.function` of your own that calls a ReplicaBuilder follows once it is "
        "created again.",
        RuntimeWarning,
        stacklevel=3,
    )


def _collective_sum(
    value: tf.Tensor, group: tuple[int, int], instance: int, **options
) -> tf.Tensor:
    """One all-reduce (sum) of `value` over `group` (its size and key), on the current
    device."""
    size, key = group
    return tf.raw_ops.CollectiveReduce(
        input=value,
        group_size=size,
        group_key=key,
        instance_key=instance,
        merge_op="Add",
        final_op="Id",
        subdiv_offsets=[0],
        **options,
    )


def _probe(devices: tuple[str, ...]) -> None:
    if devices not in _probes:
        instance = _new_instance()

        @tf.function(autograph=False)
        def probe():
            summed = []
            for device in devices:
                with tf.device(device):
                    summed.append(
                        _collective_sum(
                            tf.ones([1]),
                            (len(devices), group_key(devices)),
                            instance,
                            timeout_seconds=60.0,
                        )
                    )
            return summed

        _probes[devices] = probe
    _probes[devices]()


def group_key(devices: Sequence[str]) -> int:
    """The collective group key of `devices` (one per set of devices, per process).

    The collective backend's runtime resolves groups over the whole job, so each
    process's keys are its own: they count from a base that its rank sets apart.
    """
    key = tuple(devices)
    with _lock:
        if key not in _groups:
            _groups[key] = _GROUP_BASE + cluster.process_rank() * _GROUPS_PER_PROCESS + len(_groups)
        return _groups[key]


def _new_instance() -> int:
    global _next_instance
    with _lock:
        _next_instance += 1
        return _next_instance - 1


def next_instance() -> int:
    """The instance key the next new all-reduce of this process would take."""
    return _next_instance


def align_instances(key: int) -> None:
    """Makes this process's next new all-reduce take `key` or later: processes that
    agreed on `key` (the largest of their `next_instance`) then count their keys
    alike, whatever each counted before."""
    global _next_instance
    with _lock:
        _next_instance = max(_next_instance, key)


def job_group(towers: int, processes: int) -> tuple[int, int]:
    """The group (size, key) of every tower of every process: the same key in each
    process, set apart from every process's own groups (`group_key`)."""
    return towers * processes, _JOB_BASE + towers


class Job:
    """How the towers of a job's processes meet inside the graph, if they do.

    They do where every process holds as many towers: in one collective over the
    job where the backend's collectives span it (`processes` > 1: the collective
    backend), else by the backend's `tower_sum` in each tower (`process_sum`:
    Horovod). The processes are asked once, eagerly, at the first trace whose
    towers would meet in the graph, with the instance key each would count from
    next, so that the job's all-reduces take keys every process counts alike.

    Args:
        backend: The process backend, or `None`.
        towers: This process's towers.
    """

    def __init__(self, backend: Any, towers: int) -> None:
        self.backend = backend
        self.towers = towers
        several = backend is not None and backend.size > 1
        spans = several and backend.collectives_span_job
        self.processes = backend.size if spans else 1
        self.process_sum = backend.tower_sum if several and not spans else None
        self._agree: bool | None = None

    def meets(self) -> bool:
        """Whether this job's towers may meet inside the graph: always in one process;
        over every process where each holds as many towers.

        Raises:
            ValueError: Under a backend whose collectives do not span the job
                (Horovod), where the processes hold different numbers of
                towers: tower k of one process would wait for a tower k that
                another process does not hold.
        """
        if self.backend is None or self.backend.size == 1:
            return True
        if self._agree is None:
            row = np.array([self.towers, next_instance()], np.int64)
            with tf.init_scope():
                table = self.backend.gather_rows(row)
            self._agree = bool((table[:, 0] == self.towers).all())
            align_instances(int(table[:, 1].max()))
            if not self._agree and self.processes == 1:
                raise ValueError(
                    "The processes of this job hold different numbers of towers "
                    f"({table[:, 0].tolist()}, by rank), and the model has synchronized "
                    f"layers. Under the {self.backend.name} backend their meetings only match "
                    "where every process holds as many towers: give each process as many "
                    "devices, or use `replicate launch` (the collective backend)."
                )
        return self._agree


def call_index(keys: Keys) -> int:
    """How many forward passes with `keys` the step being traced has run before this one."""
    graph = tf.compat.v1.get_default_graph()
    with _lock:
        counts = _calls.setdefault(graph, {})
        index = counts.get(keys, 0)
        counts[keys] = index + 1
        return index


class Keys:
    """The instance keys of one forward function, by pass, direction and trace position."""

    def __init__(self) -> None:
        self._keys: dict[tuple[int, str, int], int] = {}
        self.position = 0

    def next(self) -> int:
        """The position of the next all-reduce in this trace."""
        self.position += 1
        return self.position - 1

    def get(self, call: int, direction: str, position: int) -> int:
        """The instance key of the all-reduce at `position` of the step's forward pass
        `call` (`direction`: forward or backward)."""
        key = (call, direction, position)
        with _lock:
            if key not in self._keys:
                self._keys[key] = _new_instance()
            return self._keys[key]


class Meeting:
    """What the all-reduces of one tower's trace need: the devices, keys and its presence.

    Args:
        devices: Every tower's device, in tower order.
        keys: The forward function's instance keys.
        present: `()` float, 1 where the calling tower holds real samples (0
            for a stand-in row, which then adds nothing); a function input, so
            that each tower's call supplies its own.
        call: Which forward pass of the step this is (`call_index`).
        job: How the towers meet over the job's processes (`Job`), or `None` for
            this process's towers only.
    """

    def __init__(
        self,
        devices: Sequence[str],
        keys: Keys,
        present: tf.Tensor,
        call: int = 0,
        job: Job | None = None,
    ) -> None:
        self.devices = list(devices)
        self.keys = keys
        self.present = present
        self.call = call
        self.processes = 1 if job is None else job.processes
        self.process_sum = None if job is None else job.process_sum
        self.graph = tf.compat.v1.get_default_graph()  # the forward pass is traced in it

    def _sum(self, value: tf.Tensor, direction: str, position: int) -> tf.Tensor:
        """The sum of every tower's `value` (masked), over every process where the towers
        meet over the job, on the calling tower's device."""
        value = reduce.scale(value, self.present)
        if self.processes > 1:
            group = job_group(len(self.devices), self.processes)
        elif len(self.devices) > 1:
            group = (len(self.devices), group_key(self.devices))
        else:
            group = None
        if group is not None:
            value = _collective_sum(value, group, self.keys.get(self.call, direction, position))
        if self.process_sum is not None:
            value = self.process_sum(value, f"replicate_meeting_{self.call}_{direction}_{position}")
        return reduce.scale(value, self.present)

    def all_reduce(self, reduce_op: tf.distribute.ReduceOp, value: Any) -> Any:
        """Sums (or averages) `value` over the towers; differentiable, as in `replica`.

        Raises:
            RuntimeError: Inside a branch of `tf.cond` or a `tf.while_loop` of the
                forward pass: a tower whose predicate took the other branch would
                never reach the collective, and the others would wait for it.
        """
        graph = tf.compat.v1.get_default_graph()
        meets = len(self.devices) * self.processes > 1 or self.process_sum is not None
        while meets and graph is not None and graph is not self.graph:
            if _keras_compat.is_control_flow_graph(graph):
                raise RuntimeError(
                    "A synchronized layer called `all_reduce` inside `tf.cond`, "
                    "`keras.ops.cond` or a `tf.while_loop`. replicate's towers meet inside "
                    "the graph, where a tower that took the other branch would never reach "
                    "the all-reduce. Call `all_reduce` outside the branch (reduce in both "
                    "branches' place, then choose), or run the model with "
                    "`run_eagerly=True`."
                )
            graph = getattr(graph, "outer_graph", None)
        flat = [tf.convert_to_tensor(v) for v in tf.nest.flatten(value)]
        count = None
        if reduce_op == tf.distribute.ReduceOp.MEAN:
            count = self._sum(tf.ones_like(self.present), "forward", self.keys.next())
        out = [self._reduce_one(v, count) for v in flat]
        return tf.nest.pack_sequence_as(value, out)

    def _reduce_one(self, value: tf.Tensor, count: tf.Tensor | None) -> tf.Tensor:
        position = self.keys.next()

        @tf.custom_gradient
        def reduced(v):
            total = self._sum(v, "forward", position)
            if count is not None:
                total = tf.math.divide_no_nan(total, tf.cast(count, total.dtype))

            def grad(upstream):
                back = self._sum(upstream, "backward", position)
                if count is not None:
                    back = tf.math.divide_no_nan(back, tf.cast(count, back.dtype))
                return back

            return total, grad

        return reduced(value)


@contextlib.contextmanager
def tracing(meeting: Meeting | None):
    """`meeting` is the calling tower's while its forward function is traced."""
    if meeting is None:
        yield
        return
    meeting.keys.position = 0
    previous = getattr(_tracing, "meeting", None)
    _tracing.meeting = meeting
    try:
        yield
    finally:
        _tracing.meeting = previous


def active() -> Meeting | None:
    """The meeting of the forward function being traced in this thread, if any."""
    return getattr(_tracing, "meeting", None)
