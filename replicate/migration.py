"""Pieces of Horovod's Keras API and of `tf.distribute` that replicate replaces, refused.

A script moved to replicate from Horovod's Keras API or from
`MirroredStrategy` often keeps one piece of the old way. Under Keras 3 those
pieces fail far from the cause, or not at all: Horovod 0.28.1's Keras
callbacks call Keras 2 functions (`BroadcastGlobalVariablesCallback`:
"'Variable' object has no attribute 'ref'"; the warm-up: "module
'keras.backend' has no attribute 'get_value'"), and its optimizer wrapper
would sum gradients replicate has already summed. `ReplicatedModel.compile` and
`fit` call `refuse` first, which names the piece and what replicate already
does in its place. Horovod is recognised by the module of an object's class,
so nothing here imports it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

_RESUME = (
    "replicate has no elastic training (a job keeps its processes): resume instead, with "
    "`keras.callbacks.BackupAndRestore(backup_dir)` in `callbacks`, and after a failure "
    "run the same command again; every process continues from the chief's last backup"
)

# Horovod callback class -> what replicate does in its place.
_CALLBACKS = {
    "BroadcastGlobalVariablesCallback": (
        "replicate broadcasts rank 0's weights and every optimizer's state at the start of "
        "every `fit`, so processes started from different seeds train identically. Remove "
        "the callback"
    ),
    "MetricAverageCallback": (
        "the loss and metrics Keras shows already cover every process's samples (each "
        "metric's state is combined across processes before its result is computed). "
        "Remove the callback"
    ),
    "LearningRateWarmupCallback": (
        "use `replicate.callbacks.LearningRateWarmup(initial_lr=..., warmup_epochs=..., "
        "verbose=...)`, which takes Horovod's arguments with the same meaning (the rate to "
        "reach, already scaled by the number of processes), except `momentum_correction`"
    ),
    "LearningRateScheduleCallback": (
        "use `keras.callbacks.LearningRateScheduler(schedule)`: every process computes the "
        "same rate"
    ),
    "BestModelCheckpoint": (
        "use `keras.callbacks.ModelCheckpoint(path, save_best_only=True)`: only rank 0 "
        "writes it, atomically"
    ),
    "CommitStateCallback": _RESUME,
    "UpdateBatchStateCallback": _RESUME,
    "UpdateEpochStateCallback": _RESUME,
}


def _is_horovod(cls: type) -> bool:
    return (getattr(cls, "__module__", "") or "").split(".")[0] == "horovod"


def _horovod_class(value: Any) -> type | None:
    """The first class in `value`'s class hierarchy that Horovod defines, if any."""
    return next((cls for cls in type(value).__mro__ if _is_horovod(cls)), None)


def _named(values: Iterable[tuple[str, Any]]) -> Iterable[tuple[str, Any]]:
    """The values, and one level inside lists, tuples and dicts, with their names."""
    for name, value in values:
        yield name, value
        if isinstance(value, (list, tuple)):
            yield from ((f"{name}[{i}]", v) for i, v in enumerate(value))
        elif isinstance(value, dict):
            yield from ((f"{name}[{k!r}]", v) for k, v in value.items())


def _refuse_horovod_value(name: str, value: Any) -> None:
    import keras

    cls = _horovod_class(value)
    if cls is None:
        return
    if isinstance(value, keras.optimizers.Optimizer):
        wrapped = next(c.__name__ for c in type(value).__mro__ if not _is_horovod(c))
        raise TypeError(
            f"`{name}` must be a plain Keras optimizer, not one wrapped by Horovod's "
            "`hvd.DistributedOptimizer`: replicate already sums the gradients of every tower "
            "and every process before the update, which is what the wrapper is for. Pass "
            "the optimizer itself, e.g. "
            f"`{name}=keras.optimizers.{wrapped}(...)`, with its learning rate scaled by the "
            "number of processes as before. Received: "
            f"{name}=hvd.DistributedOptimizer({wrapped}(...))"
        )
    raise TypeError(
        f"`{name}` is a Horovod object, which replicate does not take: replicate does "
        "Horovod's part itself (gradients summed over towers and processes, the start "
        "broadcast). Pass plain Keras objects. Received: "
        f"{name}={type(value).__module__}.{type(value).__name__}"
    )


def _refuse_callbacks(callbacks: Any) -> None:
    if callbacks is None:
        return
    if not isinstance(callbacks, (list, tuple)):
        callbacks = getattr(callbacks, "callbacks", [callbacks])  # a CallbackList
    for callback in callbacks:
        if _horovod_class(callback) is None:
            continue
        name = type(callback).__name__
        instead = _CALLBACKS.get(
            name,
            "replicate does the work of Horovod's Keras callbacks itself (the start "
            "broadcast, metrics over every process, chief-only writes). Remove it",
        )
        raise TypeError(
            f"`callbacks` holds Horovod's `{name}`, which replicate replaces: {instead}. "
            "(Horovod 0.28.1's Keras callbacks call Keras 2 functions that Keras 3 lacks.) "
            f"Received: callbacks=[..., {type(callback).__module__}.{name}(...), ...]"
        )


def _refuse_strategy(template: Any) -> None:
    import tensorflow as tf

    if tf.distribute.has_strategy():
        strategy = type(tf.distribute.get_strategy()).__name__
        raise RuntimeError(
            f"A replicated model must not be compiled or trained inside a `{strategy}` "
            "scope: replicate(model) already does what the strategy would (towers on every "
            "device, gradients summed, the update applied once; across processes, the "
            "collective backend takes MultiWorkerMirroredStrategy's place). Build, compile "
            f"and fit the model outside `strategy.scope()`. Received: an active {strategy} "
            "scope"
        )
    for variable in list(getattr(template, "variables", []))[:1]:
        value = getattr(variable, "value", variable)
        if isinstance(value, tf.distribute.DistributedValues):
            raise RuntimeError(
                "The model's variables were made inside a `tf.distribute` strategy scope "
                "(one copy per device), while replicate keeps one copy of the weights on "
                "its variable device. Build the model outside `strategy.scope()`, then "
                "`replicate.replicate(model)`. Received: variable "
                f"{getattr(variable, 'path', variable.name)!r} of type {type(value).__name__}"
            )


def _compile_arguments(template: Any, args: tuple, kwargs: dict) -> list[tuple[str, Any]]:
    """`compile`'s arguments with the names the template's `compile` gives them."""
    import inspect

    try:
        bound = inspect.signature(template.compile).bind_partial(*args, **kwargs)
        return list(bound.arguments.items())
    except (TypeError, ValueError):
        return [(f"argument {i}", a) for i, a in enumerate(args)] + list(kwargs.items())


def refuse(
    template: Any,
    compile_call: tuple[tuple, dict] | None = None,
    *,
    callbacks: Any = None,
) -> None:
    """Refuses Horovod's Keras wrappers and callbacks and `tf.distribute` strategies.

    Args:
        template: The replicated model's template.
        compile_call: `(args, kwargs)` given to `compile`; when `None` (in
            `fit`), the optimizers the template holds are checked instead (a
            template compiled before `replicate`).
        callbacks: The `callbacks` given to `fit`.

    Raises:
        TypeError: For an optimizer wrapped by `hvd.DistributedOptimizer`,
            another Horovod object given to `compile`, or one of Horovod's
            Keras callbacks; the message says what replicate does in its place.
        RuntimeError: Inside a `tf.distribute` strategy scope, or for a model
            whose variables were made in one.
    """
    _refuse_strategy(template)
    if compile_call is None:
        from replicate.steps import optimizers

        named = [("optimizer", optimizer) for optimizer in optimizers(template)]
    else:
        named = _compile_arguments(template, *compile_call)
    for name, value in _named(named):
        _refuse_horovod_value(name, value)
    _refuse_callbacks(callbacks)
