"""The causes `replicate.check` can name, from what differs between the towers and one
device (`replicate.comparison` measures; this module explains).

Each cause is one sentence that names the layers or variables behind it and what to
do: a forward pass that mixes samples, unsynchronized BatchNormalization, a state
whose aggregation does not fit it, a model loss that is not a mean over samples (the
layers adding it), sparse gradients under Adam, a model's own `train_step` computing
its losses per tower. What nothing explains is said as such, never left silent.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from replicate import _keras_compat, activity
from replicate.state import owner


def name(report: Any, template: keras.Model, x: Any) -> None:
    """Turns what differs into the causes replicate can name."""
    inference = [(k, v) for k, v in report.differing("output") if k.endswith("training=False")]
    if inference:
        what, worst = max(inference, key=lambda item: item[1])
        report.causes.append(
            "the forward pass mixes samples across the batch: outputs differ with "
            f"training=False ({what}: max relative difference {worst:.2e})"
        )
        return
    normalizing = [
        layer.name
        for layer in _keras_compat.sublayers(template)
        if "BatchNormalization" in type(layer).__name__
        and getattr(layer, "synchronized", False) is not True
    ]
    training = [(k, v) for k, v in report.differing() if not k.startswith("step result")]
    unseen = not any(k.startswith("output") for k, _ in report.differences)
    if (training or unseen) and normalizing and len(report.devices) > 1:
        names = ", ".join(f"`{n}`" for n in normalizing[:3])
        if len(normalizing) > 3:
            names += f" and {len(normalizing) - 3} more"
        report.causes.append(
            f"BatchNormalization layers {names} normalize per tower; use synchronized=True"
        )
    explained = {f"state {v.path}" for n in normalizing for v in _layer(template, n).weights}
    for key, value in report.differing("state"):
        path = key[len("state ") :].rsplit(", ", 1)[0]
        if f"state {path}" in explained:
            continue
        variable = next((v for v in template.variables if v.path == path), None)
        layer = None if variable is None else owner(template, variable)
        name = "a layer" if layer is None else f"layer `{layer.name}`"
        aggregation = getattr(variable, "aggregation", "none")
        report.causes.append(
            f"{name} writes `{path}` per tower, and its aggregation ({aggregation!r}) does "
            f"not combine the towers' values as one device computes it (max relative "
            f"difference {value:.2e}); choose aggregation='sum', 'mean' or "
            "'only_first_replica' to match what the variable means"
        )
        explained.add(f"state {path}")
    outputs = [k for k, _ in report.differing("output")]
    if training and not outputs and not normalizing and report.model_losses:
        what, worst = max(training, key=lambda item: item[1])
        adders = ", ".join(_loss_adders(template, x, report.slices, report.rtol))
        adders = adders or "its layers"
        report.causes.append(
            f"the model's own losses differ while its outputs agree (added by {adders}): a "
            "scalar loss that reduces over the batch other than as a mean (`add_loss` of a "
            "sum), or that mixes samples (a regularizer over products across the batch), is "
            "each tower's on its slice, weighted by its share; add a sum as a mean or one row "
            "per sample, and compute a loss that mixes samples in `compute_loss` from an "
            f"output of the model, once over the whole batch ({what}: {worst:.2e})"
        )
    squared = [(k, v) for k, v in training if " rows squared, " in k]
    if squared and len(squared) == len(training):
        names = ", ".join(
            f"`{k[len('gradient ') :].split(' rows squared')[0]}`" for k, _ in squared
        )
        report.causes.append(
            f"the sparse gradients of {names} have other rows through the towers than on one "
            "device (one device gives one row per id in the batch, the towers one per id per "
            "tower): their sums agree, but Adam, RMSprop and Adagrad square each row before "
            f"adding them, so those optimizers update them differently (max relative "
            f"difference {max(v for _, v in squared):.2e}); SGD is exact"
        )
    # What the step returns, or (where no other cause explains them) the weights it moved.
    step = report.differing("step result")
    if not report.causes:
        step += report.differing("weight after the step")
    if step:
        what, worst = max(step, key=lambda item: item[1])
        report.causes.append(
            "the model's own train_step gives other results through the towers: each tower "
            "computes the step's losses on its slice of the batch, so a loss that is not a "
            "mean over the samples (a sum, or in-batch: contrastive) differs "
            f"({what}: {worst:.2e})"
        )
    drawing = [
        layer.name
        for layer in _keras_compat.sublayers(template)
        if any(isinstance(v, keras.random.SeedGenerator) for v in vars(layer).values())
        and not any(hasattr(layer, name) for name in ("rate", "stddev"))
    ]
    if training and not report.causes and drawing:
        names = ", ".join(f"`{n}`" for n in drawing)
        report.notes.append(
            f"layers {names} draw random numbers (expected to differ per tower): what differs "
            "with training=True is put down to them"
        )
    elif training and not report.causes:
        what, worst = max(training, key=lambda item: item[1])
        report.causes.append(
            f"outputs or gradients differ with training=True for a reason replicate cannot "
            f"name ({what}: max relative difference {worst:.2e})"
        )


def _loss_adders(template: keras.Model, x: Any, sizes: list[int], rtol: float) -> list[str]:
    """The innermost layers that add losses of their own (an activity regularizer,
    `add_loss`; weight regularizers left out, they do not depend on the batch) whose
    losses the towers do not combine as one device computes them: on the towers' slices
    (`sizes`), weighted by their share (summed, for an activity regularizer on a Keras
    that sums it: `replicate.activity`), against the whole batch. Calls on one device,
    nothing written (a stateless scope)."""

    def losses(rows):
        found = {}
        with keras.StatelessScope(collect_losses=True):
            template(tf.nest.map_structure(lambda t: t[rows], x), training=True)
            for layer in [template, *_keras_compat.sublayers(template)]:
                regularized = sum(w.regularizer is not None for w in layer.trainable_weights)
                values = [float(tf.reduce_sum(v)) for v in layer.losses]
                found[id(layer)] = (layer, len(values) > regularized, sum(values))
        return found

    try:
        whole, starts = losses(slice(None)), np.cumsum([0, *sizes])
        parts = [losses(slice(a, b)) for a, b in zip(starts[:-1], starts[1:]) if b > a]
    except Exception:  # a model whose call takes other arguments: named without layers
        return []
    kept = [size for size in sizes if size]
    names, adders = [], []
    for key, (layer, adds, value) in whole.items():
        inner = [whole.get(id(s), (None, False, 0))[1] for s in _keras_compat.sublayers(layer)]
        if not adds or any(inner):
            continue
        regularizer = getattr(layer, "activity_regularizer", None)
        summed = regularizer is not None and activity.MEAN_SINCE > _keras_compat.KERAS_VERSION
        shares = [1.0 if summed else size / sum(kept) for size in kept]
        combined = sum(share * part[key][2] for share, part in zip(shares, parts))
        kind = (
            "add_loss"
            if regularizer is None
            else f"activity_regularizer {type(regularizer).__name__}"
        )
        adders.append(f"`{layer.name}` ({kind})")
        if abs(combined - value) > rtol * max(abs(value), 1e-12):
            names.append(adders[-1])
    return names or adders


def _layer(model: keras.Model, name: str) -> keras.Layer:
    return next(layer for layer in _keras_compat.sublayers(model) if layer.name == name)
