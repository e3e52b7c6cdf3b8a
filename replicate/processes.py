"""Keras `fit` and `evaluate` across processes: agreed steps, one writer, no hangs.

Every process must run the same number of steps, or a collective waits for
ever. `prepare_fit` and `prepare_evaluate` rewrite the call so that they do,
whatever the inputs (arrays, `tf.data`, `PyDataset`), training and
validation, with or without `steps_per_epoch`: a process whose data runs out
first gets empty batches. A Python generator, whose length nobody can know in
advance, needs `steps_per_epoch`/`validation_steps`/`steps` or is refused;
with them, one that runs out yields empty batches too. `prepare_fit` also puts
`replicate.lockstep.Lockstep` last among the callbacks.

`failures` runs the hang watchdog (`replicate.watchdog`) over a `fit`,
`evaluate` or write and turns a lost peer's low-level error into replicate's
message.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from replicate import meeting, results
from replicate.backends.agreement import Position
from replicate.data import ProcessBatches, agree_on_steps
from replicate.lockstep import CatchingLockstep, ChiefWriters, Lockstep, has_batch_end_hook

# Callbacks that write files: only the chief runs them.
CHIEF_ONLY = (
    keras.callbacks.ModelCheckpoint,
    keras.callbacks.TensorBoard,
    keras.callbacks.CSVLogger,
)


def state_variables(template: keras.Model) -> list[Any]:
    """What training changes: the template's variables, then every optimizer's."""
    from replicate.steps import optimizers

    variables = list(template.variables)
    for optimizer in optimizers(template):
        variables += list(optimizer.variables)
    return variables


def bind(method: Callable[..., Any], model: keras.Model, args: tuple, kwargs: dict) -> dict:
    """The arguments of `method(model, *args, **kwargs)` by name, defaults filled in."""
    bound = inspect.signature(method).bind(model, *args, **kwargs)
    bound.apply_defaults()
    call = dict(bound.arguments)
    call.pop("self")
    call.update(call.pop("kwargs", {}))
    return call


class AgreedBatches(keras.utils.PyDataset):
    """A `PyDataset` padded with empty batches up to the most steps of any process."""

    def __init__(self, inner: keras.utils.PyDataset, backend: Any) -> None:
        super().__init__(
            workers=inner.workers,
            use_multiprocessing=inner.use_multiprocessing,
            max_queue_size=inner.max_queue_size,
        )
        self.inner = inner
        self.watchdog = backend.watchdog
        try:
            self.local = len(inner)
        except TypeError:
            raise ValueError(_NEEDS_STEPS.format(what="an endless PyDataset")) from None
        self.steps = int(backend.reduce_max(tf.constant(self.local)))
        self._empty = None

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> Any:
        with self.watchdog.fetching():
            if index < self.local:
                return self.inner[index]
            if self._empty is None:
                self._empty = tf.nest.map_structure(lambda a: np.asarray(a)[:0], self.inner[0])
            return self._empty

    def on_epoch_end(self) -> None:
        self.inner.on_epoch_end()


_NEEDS_STEPS = (
    "Across processes every process must run the same number of steps, which "
    "replicate cannot count for {what}. Pass `steps_per_epoch` (and "
    "`validation_steps`, or `steps` for evaluate), or give arrays, a tf.data.Dataset "
    "or a keras.utils.PyDataset."
)


def _as_arrays(x: Any) -> Any | None:
    """`x` as numpy arrays if it is array data (numpy, eager tensors, pandas), else None."""
    leaves = tf.nest.flatten(x)
    if not leaves:
        return None
    kinds = (np.ndarray, tf.Tensor)
    if not all(isinstance(v, kinds) or type(v).__module__.startswith("pandas") for v in leaves):
        return None
    return tf.nest.map_structure(np.asarray, x)


def _padded(generator: Any) -> Any:
    """`generator`'s batches, then empty batches (0 samples, which add nothing) for ever."""
    first = None
    for item in generator:
        if first is None:
            first = item
        yield item
    if first is None:
        return
    empty = tf.nest.map_structure(lambda a: np.asarray(a)[:0], first)
    while True:
        yield empty


def _agree(data: Any, backend: Any, *, what: str, steps: Any) -> Any:
    """One non-array input made to run the same number of steps on every process.

    With `steps` given, Keras runs that many steps per epoch and continues the
    same iterator in the next epoch, ending an epoch early where the data
    runs out. Padding every process's data to the longest one's makes those
    epochs end at the same step everywhere.
    """
    if isinstance(data, tf.data.Dataset):
        return agree_on_steps(data, backend)
    if isinstance(data, keras.utils.PyDataset):
        return AgreedBatches(data, backend)
    if hasattr(data, "__next__") or hasattr(data, "gi_frame"):
        if steps is not None:
            return _padded(data)
        raise ValueError(_NEEDS_STEPS.format(what=f"a Python generator (`{what}`)"))
    if steps is not None:
        return data
    raise ValueError(
        f"Across processes, `{what}` must be arrays, a tf.data.Dataset or a "
        f"keras.utils.PyDataset. Received: {what} of type {type(data).__name__}."
    )


def _chief_only_output(call: dict[str, Any], backend: Any) -> ChiefWriters:
    """Leaves progress bars and file-writing callbacks to the chief; returns, on the
    others, when the chief's checkpoints write (so that they wait for it calmly)."""
    if backend.is_chief:
        return ChiefWriters()
    callbacks = list(call.get("callbacks") or [])
    call["verbose"] = 0
    call["callbacks"] = [c for c in callbacks if not isinstance(c, CHIEF_ONLY)]
    return ChiefWriters([c for c in callbacks if isinstance(c, keras.callbacks.ModelCheckpoint)])


def _arrays_call(call: dict[str, Any], backend: Any, batch_size: int, **options) -> None:
    call["x"] = ProcessBatches(
        call["x"],
        call.get("y"),
        call.get("sample_weight"),
        batch_size=batch_size,
        backend=backend,
        **options,
    )
    call["y"] = call["sample_weight"] = call["batch_size"] = None


def _validation(data: Any, backend: Any, *, batch_size: int, steps: Any) -> Any:
    if isinstance(data, (tuple, list)):
        arrays = _as_arrays(tuple(data))
        if arrays is None:
            raise ValueError(
                "Across processes, `validation_data` given as a tuple must hold arrays "
                "(x, y[, sample_weight]). Received a tuple of "
                f"{[type(v).__name__ for v in data]}."
            )
        return ProcessBatches(*arrays, batch_size=batch_size, backend=backend)
    return _agree(data, backend, what="validation_data", steps=steps)


def prepare_fit(call: dict[str, Any], backend: Any, variables: Any) -> None:
    """Rewrites `fit`'s arguments so that every process runs the same steps.

    Args:
        call: `fit`'s arguments by name (`bind`), changed in place.
        backend: The model's process backend.
        variables: What training changes (weights and optimizer state), for
            the step tokens' fingerprint.
    """
    from replicate.resume import process_aware_callbacks

    writers = _chief_only_output(call, backend)
    callbacks = process_aware_callbacks(call.get("callbacks"), backend)
    if backend.lockstep:
        # A batch-end hook of Lockstep's own would make Keras wait for the callbacks
        # after every step; it needs one only where another callback has one.
        kind = CatchingLockstep if any(map(has_batch_end_hook, callbacks)) else Lockstep
        callbacks.append(kind(backend, variables, writers))
    call["callbacks"] = callbacks
    batch_size = call.get("batch_size") or 32
    split = call.pop("validation_split", 0.0)
    arrays = _as_arrays(call.get("x"))
    if arrays is not None:
        call["x"] = arrays
        call["y"] = None if call.get("y") is None else _as_arrays(call["y"])
        call["sample_weight"] = (
            None if call.get("sample_weight") is None else np.asarray(call["sample_weight"])
        )
        if split:
            _split_validation(call, backend, split, batch_size)
        _arrays_call(call, backend, batch_size, shuffle=bool(call.get("shuffle", False)))
    else:
        if split:
            raise ValueError(
                "`validation_split` is only supported for arrays (as in Keras). Received: "
                f"x of type {type(call.get('x')).__name__}."
            )
        call["x"] = _agree(call["x"], backend, what="x", steps=call.get("steps_per_epoch"))
    if call.get("validation_data") is not None:
        call["validation_data"] = _validation(
            call["validation_data"],
            backend,
            batch_size=call.get("validation_batch_size") or batch_size,
            steps=call.get("validation_steps"),
        )


def _split_validation(call: dict[str, Any], backend: Any, split: float, batch_size: int) -> None:
    n = len(tf.nest.flatten(call["x"])[0])
    cut = int(n * (1.0 - split))

    def part(a, piece):
        return tf.nest.map_structure(lambda v: None if v is None else v[piece], a)

    head, tail = slice(None, cut), slice(cut, None)
    call["validation_data"] = ProcessBatches(
        part(call["x"], tail),
        part(call.get("y"), tail),
        part(call.get("sample_weight"), tail),
        batch_size=call.get("validation_batch_size") or batch_size,
        backend=backend,
    )
    for key in ("x", "y", "sample_weight"):
        call[key] = part(call.get(key), head)


def prepare_evaluate(call: dict[str, Any], backend: Any) -> None:
    """Rewrites `evaluate`'s arguments so that every process runs the same steps."""
    _chief_only_output(call, backend)
    arrays = _as_arrays(call.get("x"))
    if arrays is not None:
        call["x"] = arrays
        call["y"] = None if call.get("y") is None else _as_arrays(call["y"])
        _arrays_call(call, backend, call.get("batch_size") or 32)
    else:
        call["x"] = _agree(call["x"], backend, what="x", steps=call.get("steps"))


_ALONE = {
    "evaluate": "evaluate on this process's devices alone with `parallel.template.evaluate(...)`",
    "save": "call it on every process (the chief writes, the others wait for it), or save "
    "`parallel.template` on this process",
    "export": "call it on every process (the chief writes, the others wait for it), or export "
    "`parallel.template` on this process",
}


@contextlib.contextmanager
def failures(backend: Any, *, during: str = "fit"):
    """Watches for hangs, and turns a lost peer's low-level error into replicate's message.

    Args:
        backend: The model's process backend.
        during: `"fit"`, `"evaluate"`, `"save"` or `"export"`, for the hint
            the message gives.
    """
    try:
        with backend.watchdog.watching():
            yield
    except Exception as error:
        message = backend.describe_failure(error)
        if message is None:
            raise
        if during in _ALONE:
            message += (
                f" If only some processes call `{during}` (e.g. `if rank == 0:`), {_ALONE[during]}."
            )
        raise RuntimeError(message) from error


def begin_fit(parallel: Any, call: dict[str, Any]) -> None:
    """Before a `fit` across processes: the processes agree on where they start
    and on their variables (`replicate.backends.agreement`), rank 0's state is
    broadcast, and every process is given the same steps and writers."""
    backend = parallel.backend
    variables = state_variables(parallel.template)
    start = Position("fit", int(call.get("initial_epoch") or 0))
    backend.agreement.meet(start, variables=variables)
    backend.broadcast_variables(variables, root_rank=0)
    prepare_fit(call, backend, variables)


def begin_evaluate(parallel: Any, call: dict[str, Any]) -> None:
    """Before an `evaluate` across processes: agree on where each process is
    (inside `fit`, Keras evaluates the validation data it already prepared)."""
    inside = bool(call.get("_use_cached_eval_dataset"))
    progress = parallel.progress
    where = ("validation", progress.epoch) if inside else ("evaluate", progress.trained)
    parallel.backend.agreement.meet(Position(*where), variables=parallel.template.variables)
    if not inside:
        prepare_evaluate(call, parallel.backend)


def step_function(
    parallel: Any, function: Callable[[Any], Any], *, skip: bool
) -> Callable[[Any], Any]:
    """`function` (one execution of Keras' steps) as a replicated model runs it.

    It is marked for the watchdog (across processes a step is made of
    collectives); an error raised inside a tower says which tower and what it
    held (`replicate.tower_errors`); for training (`skip`), it first passes
    over the batches a restored backup had already trained on, and across
    processes it keeps the step in lockstep (`replicate.lockstep`). A step of a
    synchronized model traced before its towers stopped meeting in the graph
    (`meeting.abandon`, after any model's failed step) is made again.
    """
    watchdog = parallel.backend.watchdog
    generation = meeting.generation()
    remade = []

    def marked(iterator):
        if not remade and meeting.generation() != generation and parallel.builder.synchronized:
            for kind in ("train", "test", "predict"):
                if getattr(parallel, f"{kind}_function", None) is marked:
                    remade.append(getattr(parallel, f"make_{kind}_function")(force=True))
        if remade:
            return remade[0](iterator)
        lockstep = parallel.progress.lockstep if skip else None  # across processes, in fit
        if skip and parallel.skip_batches > 0:
            for _ in range(min(parallel.skip_batches, parallel.steps_per_execution)):
                next(iterator)
                parallel.skip_batches -= 1
            if lockstep is not None:
                lockstep.after(parallel.steps_per_execution, ran=False)
            return {}
        try:
            with lockstep or contextlib.nullcontext(), watchdog.waiting():
                logs = function(iterator)
                # The step's agreement token (`replicate.results`), in training and
                # evaluation logs; the lockstep reads it as the step ends.
                token = logs.pop(results.TOKEN, None) if isinstance(logs, dict) else None
                if lockstep is not None:
                    lockstep.returned = token
        except tf.errors.OpError as error:
            if parallel.builder.met_in_graph and not isinstance(error, tf.errors.OutOfRangeError):
                meeting.abandon()  # later steps meet in threads: traced again
            described = parallel.builder.errors.describe(error)
            if described is None:
                raise
            raise described from error
        return logs

    return marked
