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

Elsewhere the towers meet in threads (`replicate.replica`): eagerly (each
collective would wait for towers that have not started), across processes
(the sum goes through the process backend), in a model's own `train_step`,
and in a process where a step whose towers met in the graph failed
(`abandon`).

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
import itertools
import threading
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from replicate import _keras_compat, reduce

_GROUP_BASE = 0x52500000
_INSTANCE_BASE = 0x52500000
_lock = threading.RLock()
_groups: dict[tuple[str, ...], int] = {}
_instances = itertools.count(_INSTANCE_BASE)
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
    value: tf.Tensor, devices: Sequence[str], instance: int, **options
) -> tf.Tensor:
    """One all-reduce (sum) of `value` over `devices`, on the current device."""
    return tf.raw_ops.CollectiveReduce(
        input=value,
        group_size=len(devices),
        group_key=group_key(devices),
        instance_key=instance,
        merge_op="Add",
        final_op="Id",
        subdiv_offsets=[0],
        **options,
    )


def _probe(devices: tuple[str, ...]) -> None:
    if devices not in _probes:
        instance = next(_instances)

        @tf.function(autograph=False)
        def probe():
            summed = []
            for device in devices:
                with tf.device(device):
                    summed.append(
                        _collective_sum(tf.ones([1]), devices, instance, timeout_seconds=60.0)
                    )
            return summed

        _probes[devices] = probe
    _probes[devices]()


def group_key(devices: Sequence[str]) -> int:
    """The collective group key of `devices` (one per set of devices, per process)."""
    key = tuple(devices)
    with _lock:
        if key not in _groups:
            _groups[key] = _GROUP_BASE + len(_groups)
        return _groups[key]


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
                self._keys[key] = next(_instances)
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
    """

    def __init__(
        self, devices: Sequence[str], keys: Keys, present: tf.Tensor, call: int = 0
    ) -> None:
        self.devices = list(devices)
        self.keys = keys
        self.present = present
        self.call = call
        self.graph = tf.compat.v1.get_default_graph()  # the forward pass is traced in it

    def _sum(self, value: tf.Tensor, direction: str, position: int) -> tf.Tensor:
        """The sum of every tower's `value` (masked), on the calling tower's device."""
        value = reduce.scale(value, self.present)
        if len(self.devices) > 1:
            instance = self.keys.get(self.call, direction, position)
            value = _collective_sum(value, self.devices, instance)
        return reduce.scale(value, self.present)

    def all_reduce(self, reduce_op: tf.distribute.ReduceOp, value: Any) -> Any:
        """Sums (or averages) `value` over the towers; differentiable, as in `replica`.

        Raises:
            RuntimeError: Inside a branch of `tf.cond` or a `tf.while_loop` of the
                forward pass: a tower whose predicate took the other branch would
                never reach the collective, and the others would wait for it.
        """
        graph = tf.compat.v1.get_default_graph()
        while len(self.devices) > 1 and graph is not None and graph is not self.graph:
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
