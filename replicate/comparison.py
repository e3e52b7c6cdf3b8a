"""The comparisons behind `replicate.check`: towers against one device, each quantity's
relative difference (the causes of what differs are named by `replicate.causes`).

Both sides run the same tower pass (`replicate.builder.ReplicaBuilder`): the
reference with one tower on the variable device, which is one device's step,
and the towers as `fit` runs them. Nothing is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from replicate import _keras_compat, causes, merge, reduce, step_comparison, steps
from replicate.builder import ReplicaBuilder
from replicate.step_comparison import error_line, noise_floor, relative_difference
from replicate.tower import is_seed_state, row_states

DEFAULT_RTOL = 1e-4


@dataclass
class Report:
    """What `check` compared, how far apart each quantity came, and why.

    Attributes:
        devices: The tower devices checked.
        slices: The samples each tower held.
        differences: `(what, max relative difference)` for everything compared.
        causes: Why the towers differ from one device, one sentence each; empty
            when they agree.
        notes: What was not compared, or compared with a change, and why.
        rtol: The relative difference above which a quantity counts as different.
    """

    devices: list[str]
    slices: list[int]
    differences: list[tuple[str, float]] = field(default_factory=list)
    causes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rtol: float = DEFAULT_RTOL
    model_losses: bool = False  # whether the model adds losses of its own

    @property
    def exact(self) -> bool:
        """Whether the towers equal one device (no cause found)."""
        return not self.causes

    def differing(self, prefix: str = "") -> list[tuple[str, float]]:
        """The differences above `rtol` whose name starts with `prefix`."""
        return [(k, v) for k, v in self.differences if k.startswith(prefix) and v > self.rtol]

    def __str__(self) -> str:
        head = (
            f"replicate.check: {len(self.devices)} towers on slices {self.slices} against one "
            f"device: {'the same' if self.exact else 'different'}"
        )
        lines = [head]
        lines += [f"  cause: {c}" for c in self.causes]
        lines += [f"  note: {n}" for n in self.notes]
        width = max((len(k) for k, _ in self.differences), default=0)
        lines += [f"  {k:<{width}}  {v:.2e}" for k, v in self.differences]
        return "\n".join(lines)


def _squared_rows(t: tf.IndexedSlices) -> np.ndarray:
    """The sum of each index's rows squared, as Keras' optimizers accumulate them."""
    return np.asarray(
        tf.convert_to_tensor(tf.IndexedSlices(tf.square(t.values), t.indices, t.dense_shape))
    )


def _numpy(t: Any) -> np.ndarray:
    if isinstance(t, tf.IndexedSlices):
        t = tf.convert_to_tensor(t)
    return np.asarray(t)


class _Pass:
    """One dry training pass of `builder`: outputs, loss, gradients, new state; no writes."""

    def __init__(self, builder: ReplicaBuilder, batch: Any, training: bool, loss: bool) -> None:
        model = builder.model
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
        slices = builder.slices(x)
        group = builder.group(slices)
        towers, values = builder.forward_passes(group, slices, training, loss)
        self.model_losses = any(
            t.model_loss is not None or t.sample_loss is not None for t in towers
        )
        self.loss, self.grads = None, []
        with tf.device(builder.variable_device):
            if loss:

                def loss_of(y_pred, model_loss):
                    return merge.batch_loss(
                        model, x, y, y_pred, sample_weight, model_loss, training=True
                    )

                result = merge.loss_pass(towers, loss_of, slices.weights, model.trainable_variables)
                self.loss, self.outputs = result.value, result.merged
            else:
                self.outputs = merge.merge([t.outputs for t in towers], [t.logits for t in towers])
        if loss:
            per_tower = group.run(
                lambda i: builder.tower_pass.backward(
                    towers[i], result.upstream[i], slices.present[i]
                )
            )
            self.grads = [reduce.add([*c, d]) for *c, d in zip(*per_tower, result.direct)]
        writer = builder.state_writer
        state = writer.combine(
            model.non_trainable_variables,
            [t.updates for t in towers],
            values,
            slices,
            processes=False,
            warn=False,
        )
        old = [tf.convert_to_tensor(v.value) for v in model.trainable_variables]
        state += writer.combine(
            model.trainable_variables,
            [t.writes for t in towers],
            old,
            slices,
            processes=False,
            warn=False,
        )
        for j, variable in enumerate(row_states(model)):
            rows = [t.rows[j] for t in towers]
            if all(r is not None for r in rows):
                state.append((variable, tf.concat(rows, 0)))
        self.state = {v.path: value for v, value in state if not is_seed_state(v)}


def compare(
    report: Report,
    template: keras.Model,
    reference: ReplicaBuilder,
    towers: ReplicaBuilder,
    batch: Any,
    whole: Any = None,
) -> None:
    """Fills `report`: the differences between `towers` and `reference`, and their causes.

    Args:
        batch: The few samples to compare on.
        whole: The whole batch they came from: where the model does not run on
            the few samples on one device either (it assumes a batch size), the
            comparison is made on the whole batch.
    """
    has_call = steps.overridden(template, "call")
    has_loss = (
        _keras_compat.compiled_loss(template) is not None
        or steps.overridden(template, "compute_loss")
        or bool(template.losses)
    )
    x, _, _ = keras.utils.unpack_x_y_sample_weight(batch)
    report.slices = [int(n) for n in towers.slices(x).sizes.numpy()]
    if has_call:
        for training in (False, True):
            with_loss = training and has_loss
            try:
                one = _Pass(reference, batch, training, with_loss)
            except Exception as error:
                if whole is not None and whole is not batch:
                    return compare(report, template, reference, towers, whole)
                report.notes.append(
                    f"the model does not run on {reference_size(batch)} samples on one device "
                    f"either, so it was not checked ({type(error).__name__}: "
                    f"{error_line(error)})"
                )
                return
            try:
                many = _Pass(towers, batch, training, with_loss)
            except Exception as error:
                report.causes.append(
                    "a tower's slice failed: the model seems to assume a fixed batch size "
                    f"({type(error).__name__}: {error_line(error)})"
                )
                return
            report.model_losses = report.model_losses or many.model_losses
            _differences(report, one, many, template, f"training={training}")
    else:
        report.notes.append("the model has no `call` of its own: its forward pass was not run")
    if steps.overridden(template, "train_step"):
        step_comparison.compare_step(report, template, reference, towers, batch)
    causes.name(report, template, x)


def reference_size(batch: Any) -> int:
    x, _, _ = keras.utils.unpack_x_y_sample_weight(batch)
    return int(reduce.batch_size(x))


def _differences(report: Report, one: _Pass, many: _Pass, template, mode: str) -> None:
    for k, (a, b) in enumerate(
        zip(tf.nest.flatten(many.outputs), tf.nest.flatten(one.outputs), strict=True)
    ):
        if a is not None:
            report.differences.append((f"output {k}, {mode}", relative_difference(a, b)))
    if one.loss is not None:
        report.differences.append((f"loss, {mode}", relative_difference(many.loss, one.loss)))
    pairs = list(zip(template.trainable_variables, many.grads, one.grads)) if one.grads else []
    grads = [
        (
            v,
            np.zeros(v.shape) if a is None else _numpy(a),
            np.zeros(v.shape) if b is None else _numpy(b),
        )
        for v, a, b in pairs
        if a is not None or b is not None
    ]
    # A gradient that is zero in exact arithmetic (a bias before BatchNormalization) is
    # rounding noise on both sides: measure it against 1% of the gradients' scale (float32
    # rounding through a synchronized BatchNormalization's sums reaches 1.5e-7 of it).
    floor = noise_floor(b for _, _, b in grads)
    for variable, a, b in grads:
        value = relative_difference(a, b, floor)
        report.differences.append((f"gradient {variable.path}, {mode}", value))
    # SGD is linear in the gradient: only the rows' sums matter to it.
    optimizer = getattr(template, "optimizer", None)
    # A LossScaleOptimizer scales the loss and hands its inner optimizer the gradients.
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    linear = isinstance(optimizer, keras.optimizers.SGD)
    # A gradient that is rounding noise on one device too (zero in exact arithmetic: a bias
    # just before a normalization, attention's key bias, which softmax ignores): at most
    # 1e-5 of the largest gradient (float32 rounds at 6e-8), and unlike a real gradient it
    # changes by more than 1% of itself between two runs that sum in another order. Adam
    # and its kin normalize each element: they turn it into steps of the learning rate.
    scale = max((float(np.max(np.abs(b))) for _, _, b in grads if b.size), default=0.0)
    noise = [
        (variable.path, float(np.max(np.abs(b))) / scale)
        for variable, a, b in grads
        if optimizer is not None
        and not linear
        and 0 < np.max(np.abs(b)) <= 1e-5 * scale
        and relative_difference(a, b) > 1e-2
    ]
    if noise:
        names = ", ".join(f"`{path}` ({size:.0e})" for path, size in noise)
        report.notes.append(
            "weights whose gradient is zero in exact arithmetic (the loss does not depend on "
            "them) and rounding noise on one device too (its size against the largest "
            f"gradient): {names}. {type(optimizer).__name__} normalizes that noise into steps "
            "of its learning rate's size, so these weights drift apart from one device's, as "
            "between any two runs that sum in another order; SGD keeps them equal"
        )
    for variable, a, b in [] if linear else pairs:
        if isinstance(a, tf.IndexedSlices) and isinstance(b, tf.IndexedSlices):
            # What Adam, RMSprop and Adagrad see: each row squared before rows are added.
            value = relative_difference(_squared_rows(a), _squared_rows(b))
            report.differences.append((f"gradient {variable.path} rows squared, {mode}", value))
    # A state that is zero in exact arithmetic (the moving mean of inputs a layer before
    # already normalized) is rounding noise on both sides too: measured against 1% of the
    # largest state of its layer (there, the moving variance).
    by_layer: dict[str, list[Any]] = {}
    for path, b in one.state.items():
        by_layer.setdefault(path.rpartition("/")[0], []).append(b)
    for path in sorted(set(one.state) | set(many.state)):
        a, b = many.state.get(path), one.state.get(path)
        floor = noise_floor(by_layer.get(path.rpartition("/")[0], []))
        value = float("inf") if a is None or b is None else relative_difference(a, b, floor)
        report.differences.append((f"state {path}, {mode}", value))
