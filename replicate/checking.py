"""replicate checks itself: does a model's step through the towers equal one device, and if
not, why.

`check` runs a few samples of one batch through the towers and through the
template on the variable device alone (the same tower pass with one tower),
and compares the outputs (`training=False` and `True`), the loss, every
gradient and every state update. Nothing is written: the model, its
optimizer and its state are as before. What differs is explained by the
causes replicate can name:

- the forward pass mixes samples across the batch (outputs differ in
  inference);
- unsynchronized BatchNormalization normalizes each tower's slice;
- a layer's state goes through an aggregation that does not fit it;
- a tower's slice fails (the model assumes the batch size);
- a model's own `train_step` computes its losses per tower.

Random layers do not raise false alarms: Keras' dropout and noise layers are
compared with their randomness off, and other draws are named as expected to
differ. Each process checks its own towers, with no collective, so a check
never waits for another process. Across processes, the first `fit` also
splits each process's first batch as the processes split the global one: a
loss that is not a mean over samples (per token, masked, a sum, in-batch) is
normalized per process, which it names (`split_loss_difference`).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from replicate import _keras_compat, building, comparison, merge, reduce, steps
from replicate.builder import ReplicaBuilder
from replicate.comparison import DEFAULT_RTOL, Report
from replicate.devices import list_devices
from replicate.step_comparison import noise_floor, relative_difference
from replicate.tower import row_states


@contextlib.contextmanager
def _without_randomness(model: keras.Model, report: Report) -> Iterator[None]:
    """Turns Keras' dropout and noise layers off for the check, and says so."""
    changed = []
    for layer in _keras_compat.sublayers(model):
        for name in ("rate", "stddev"):
            value = getattr(layer, name, None)
            if isinstance(value, (int, float)) and value > 0 and _draws(layer):
                changed.append((layer, name, value))
    for layer, name, _ in changed:
        setattr(layer, name, 0.0)
    if changed:
        names = ", ".join(f"`{layer.name}`" for layer, _, _ in changed)
        report.notes.append(
            f"layers {names} draw random numbers; compared with their randomness off "
            "(their draws differ per tower by design, as between any two runs)"
        )
    try:
        yield
    finally:
        for layer, name, value in changed:
            setattr(layer, name, value)


def _draws(layer: keras.Layer) -> bool:
    """Whether `layer` holds a seed generator (its random draws come from one)."""
    return any(isinstance(v, keras.random.SeedGenerator) for v in vars(layer).values())


def default_rtol(model: keras.Model) -> float:
    """The relative difference below which the check counts towers and one device equal.

    1e-4 for float32 layers (the towers sum in another order than one
    device: float32 rounding, about 1e-7 per operation, stays far below it).
    Where a layer computes in a lower precision (`keras.mixed_precision`
    policies), 8 times that dtype's machine epsilon: 7.8e-3 for float16,
    6.3e-2 for bfloat16, since every rounding step there is that much
    coarser.

    Returns:
        A float: the relative tolerance.
    """
    widest = DEFAULT_RTOL
    for layer in [model, *_keras_compat.sublayers(model)]:
        epsilon = _EPSILON.get(getattr(layer, "compute_dtype", None), 0.0)
        widest = max(widest, 8 * epsilon)
    return widest


# Machine epsilon: 2**-(mantissa bits); IEEE 754 half precision has 10, bfloat16 has 7.
_EPSILON = {"float16": 2.0**-10, "bfloat16": 2.0**-7}


def check(
    model: keras.Model,
    x: Any,
    y: Any = None,
    sample_weight: Any = None,
    *,
    devices: Sequence[str] | None = None,
    batch_size: int | None = None,
    samples_per_tower: int = 2,
    rtol: float | None = None,
) -> Report:
    """Checks that a step through the towers equals one device, or says why not.

    Args:
        model: A replicated model (its devices and variable device are used)
            or a plain Keras model.
        x, y, sample_weight: What `fit` takes (arrays, a `tf.data.Dataset`,
            a `keras.utils.PyDataset`), or one batch. Only the first
            `samples_per_tower * towers + 1` samples of the first batch are
            used (the towers' slices are then uneven).
        devices: The tower devices, for a plain model. Defaults to
            `replicate.list_devices()`.
        batch_size: The global batch, for arrays (as `fit` takes it). A model
            that does not run on a few samples on one device either (it
            assumes its batch size) is compared on a whole batch. Defaults to
            32, as in `fit`.
        samples_per_tower: Samples each tower gets (about). Defaults to 2.
        rtol: Relative difference above which a quantity differs
            (max |towers - one device| / max |one device|). Defaults to
            `default_rtol(model)`: 1e-4, wider where layers compute in a
            lower precision (mixed precision).

    Returns:
        A `Report`; `report.exact` is whether they agree, `report.causes`
        says why not, and `str(report)` prints every comparison.

    Raises:
        TypeError: If `model` is not a Keras model.
        ValueError: If the data cannot be looked into (a Python generator):
            pass one batch instead; or if `samples_per_tower` or `batch_size`
            is not a positive integer, or `rtol` not a positive number.
    """
    _require_positive_int("samples_per_tower", samples_per_tower)
    if batch_size is not None:
        _require_positive_int("batch_size", batch_size)
    if rtol is not None and (
        isinstance(rtol, bool) or not isinstance(rtol, numbers.Real) or not 0 < rtol < math.inf
    ):
        raise ValueError(
            f"`rtol` must be a positive number (a relative difference, such as 1e-4) or None "
            f"for the model's default. Received: rtol={rtol!r}"
        )
    template = getattr(model, "template", None)
    if isinstance(template, keras.Model) and isinstance(
        getattr(model, "builder", None), ReplicaBuilder
    ):
        devices, variable_device = model.devices, model.variable_device
    elif isinstance(model, keras.Model):
        template, variable_device = model, "/cpu:0"
        devices = list_devices() if devices is None else list(devices)
    else:
        raise TypeError(
            "`model` must be a Keras model or a replicated one. Received: "
            f"model={model!r} of type {type(model).__name__}"
        )
    batch = building.first_batch(
        {"x": x, "y": y, "sample_weight": sample_weight, "batch_size": batch_size}
    )
    if batch is None:
        raise ValueError(
            "replicate.check cannot look into a Python generator without consuming it. "
            "Pass one batch instead: `replicate.check(model, x_batch, y_batch)`."
        )
    reference = ReplicaBuilder(template, [variable_device], variable_device=variable_device)
    towers = ReplicaBuilder(template, devices, variable_device=variable_device)
    towers.require_weights()
    whole = batch
    if not row_states(template):  # a stateful RNN needs the batch it was built for
        rows = samples_per_tower * len(devices) + 1
        batch = tf.nest.map_structure(lambda t: building.head(t, rows), batch)
    rtol = default_rtol(template) if rtol is None else rtol
    report = Report(devices=list(devices), slices=[], rtol=rtol)
    with _without_randomness(template, report):
        comparison.compare(report, template, reference, towers, batch, whole)
    empty = [i for i, size in enumerate(report.slices) if size == 0]
    if empty:
        report.notes.append(
            f"towers {empty} held no samples: the batch held {sum(report.slices)} for "
            f"{len(devices)} towers, so only the others were compared; pass a batch of at "
            f"least {len(devices)} samples to compare every tower"
        )
    return report


def _require_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")


CHECKS = (True, False, "strict")


def split_loss_difference(template: keras.Model, batch: Any, processes: int) -> float | None:
    """How far the loss of `batch` and its gradient move when `processes` processes each
    compute them on their share, weighted by their samples, as across processes: the
    larger relative difference from the whole batch's (rounding for a mean over samples;
    a loss per token, a sum or an in-batch loss moves). Gradients are measured against 1%
    of the largest (`step_comparison.noise_floor`). `None` where it does not apply: a
    model's own `train_step` or stateful RNN, no compiled loss, fewer samples than
    processes. Nothing is written (inference calls on the variable device)."""
    if (
        steps.overridden(template, "train_step")
        or row_states(template)
        or _keras_compat.compiled_loss(template) is None
    ):
        return None
    leaves = [t for t in tf.nest.flatten(batch) if t is not None]
    if any(isinstance(t, tf.SparseTensor) for t in leaves) or int(leaves[0].shape[0]) < processes:
        return None
    count = int(leaves[0].shape[0])
    weights = template.trainable_variables

    def loss(rows):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(
            tf.nest.map_structure(lambda t: None if t is None else t[rows], batch)
        )
        with tf.GradientTape() as tape:
            y_pred = template(x, training=False)
            value = merge.batch_loss(template, x, y, y_pred, sample_weight, None, training=False)
        grads = tape.gradient(value, weights, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return float(value), [np.asarray(tf.convert_to_tensor(g)) for g in grads]

    whole, whole_grads = loss(slice(None))
    split, split_grads, start = 0.0, [np.zeros_like(g) for g in whole_grads], 0
    for size in reduce.split_counts(count, processes):
        value, grads = loss(slice(start, start + size))
        split += size / count * value
        split_grads = [a + size / count * g for a, g in zip(split_grads, grads)]
        start += size
    floor = noise_floor(whole_grads)
    moved = [relative_difference(a, b, floor) for a, b in zip(split_grads, whole_grads)]
    return max([abs(split - whole) / max(abs(whole), 1e-12), *moved])


def _warn_or_raise(message: str, mode: bool | str) -> None:
    if mode == "strict":
        raise ValueError(message + "(check='strict' was passed to replicate.replicate.)")
    warnings.warn(
        message + "To train anyway without this check, pass `check=False` to "
        "`replicate.replicate`; `check='strict'` raises instead of warning.",
        stacklevel=4,
    )


def at_first_fit(parallel: keras.Model, call: dict[str, Any], mode: bool | str) -> None:
    """The automatic check at the start of a replicated model's first `fit`.

    Silent when the towers equal one device (or there is one tower, or the
    data is a generator it cannot look into); otherwise one warning naming
    the causes, or with `mode="strict"` a `ValueError`. Across processes, a
    loss that is not a mean over samples is named too (`split_loss_difference`):
    each process normalizes it over its own batch.
    """
    if mode is False:
        return
    batch = building.first_batch(call)
    if batch is None:
        return
    processes = parallel.backend.size
    if processes > 1:
        try:
            moved = split_loss_difference(parallel.template, batch, processes)
        except Exception:  # what the loss cannot run on a part of: the step will say
            moved = None
        if moved is not None and moved > default_rtol(parallel.template):
            _warn_or_raise(
                "replicate: this model's loss is not a mean over its samples (per token, "
                f"masked or in-batch: the first batch split {processes} ways, weighted by "
                f"samples, moves its loss or gradient by {moved:.1e}, relatively): each of the "
                f"{processes} processes normalizes it over its own batch, so training differs "
                "from one process holding every sample (within a process it is exact). "
                "Express it as a mean over samples to train exactly across processes. ",
                mode,
            )
    if len(parallel.devices) < 2:
        return
    try:
        report = check(parallel, batch)
    except Exception as error:
        if mode == "strict":
            raise
        warnings.warn(
            f"replicate could not check this model against one device ({type(error).__name__}: "
            f"{error}); training goes on without the check. Pass `check=False` to "
            "`replicate.replicate` to skip it.",
            stacklevel=3,
        )
        return
    if report.exact:
        return
    _warn_or_raise(
        f"replicate: this model does not train as on one device through "
        f"{len(parallel.devices)} towers: {'; '.join(report.causes)}. "
        "`print(replicate.check(model, x, y))` shows every comparison. ",
        mode,
    )
