"""The tower pass: one tower's forward pass on its device, kept open for its backward pass.

A tower reads the shared weights into tower-local tensors, calls the model
statelessly on its slice of the batch (`keras.StatelessScope`: state updates
and model losses come back as values instead of being written), and keeps
its tape, so that once the loss is known on the variable device it can
backpropagate its share of the loss's gradient on its own device
(`output_gradients`). With `jit_compile` the forward call is one XLA
computation per tower, placed on the tower's device.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import keras
import tensorflow as tf

from replicate import _keras_compat, merge, reduce

# Tower k (counted over every process) draws its random numbers (Dropout
# masks, noise) from the seed shifted by k times this odd constant, so towers
# never share a mask while tower 0 of process 0 keeps the exact random stream
# of a single-device run.
SEED_STRIDE = 1_000_003


def is_seed_state(variable: keras.Variable) -> bool:
    """Whether `variable` is a Keras `SeedGenerator`'s state."""
    return variable.name == "seed_generator_state"


def _call_accepts_training(model: keras.Model) -> bool:
    params = inspect.signature(model.call).parameters
    return "training" in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
    )


class Tower(NamedTuple):
    """One tower's forward pass, kept for its backward pass."""

    outputs: Any  # real rows only, masks attached
    targets: list[tf.Tensor]  # what the loss can depend on: float outputs, model loss
    model_loss: tf.Tensor | None  # the model's own losses on this slice, summed
    updates: list[Any]  # new non-trainable values (None where unchanged)
    tape: tf.GradientTape | None
    trainable: list[tf.Tensor]  # this tower's copies of the weights


class TowerPass:
    """Runs the forward and backward pass of one tower of `model` at a time.

    Args:
        model: The template (its variables live on the variable device).
        jit_compile: Compile each tower's forward pass with XLA.
    """

    def __init__(self, model: keras.Model, *, jit_compile: bool = False) -> None:
        self.model = model
        self.jit_compile = jit_compile
        self._training_arg = _call_accepts_training(model)
        self._compiled: Callable[..., Any] | None = None

    # -- random seeds -----------------------------------------------------------

    def tower_state(self, tower: int, values: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        """Non-trainable values as global tower `tower` sees them: its own random seeds."""
        shift = tower * SEED_STRIDE
        if shift == 0:
            return list(values)
        shifted = []
        for variable, value in zip(self.model.non_trainable_variables, values):
            if is_seed_state(variable):
                value = value + tf.constant([shift, 0], value.dtype)
            shifted.append(value)
        return shifted

    # -- forward ------------------------------------------------------------------

    def _call(self, trainable, state, x, training):
        """One stateless model call: outputs, their masks, new state values, model losses."""
        model = self.model
        mapping = list(zip(model.trainable_variables, trainable)) + list(
            zip(model.non_trainable_variables, state)
        )
        with keras.StatelessScope(state_mapping=mapping, collect_losses=True) as scope:
            before = {id(v): scope.get_current_value(v) for v in model.non_trainable_variables}
            if self._training_arg:
                outputs = model(x, training=training)
            else:
                outputs = model(x)
            losses = list(model.losses)
        updates = []
        for v in model.non_trainable_variables:
            new = scope.get_current_value(v)
            updates.append(None if new is before[id(v)] else new)
        masks = [_keras_compat.get_mask(t) for t in tf.nest.flatten(outputs)]
        return outputs, masks, updates, losses

    def _call_function(self) -> Callable[..., Any]:
        if not self.jit_compile:
            return self._call
        if self._compiled is None:
            self._compiled = tf.function(self._call, jit_compile=True, reduce_retracing=True)
        return self._compiled

    def forward(
        self,
        tower: int,
        part: Any,
        size: tf.Tensor,
        state: list,
        training: bool,
        *,
        watch: bool = True,
    ) -> Tower:
        """The forward pass of one tower on `part` (its slice, `size` real rows).

        Args:
            tower: The tower's index over every process (for its random seeds).
            part: The tower's slice of the batch (at least one row).
            size: How many of its rows are real samples.
            state: The non-trainable variables' values at the step's start.
            training: The model's `training` argument.
            watch: Keep a tape for the backward pass.
        """
        trainable = [tf.identity(v.value) for v in self.model.trainable_variables]
        tape = tf.GradientTape(watch_accessed_variables=False)
        with tape if watch else contextlib.nullcontext():
            if watch:
                tape.watch(trainable)
            out, masks, updates, losses = self._call_function()(
                trainable, self.tower_state(tower, state), part, training
            )
            for t, mask in zip(tf.nest.flatten(out), masks):
                if mask is not None:
                    _keras_compat.set_mask(t, mask)
            outputs = merge.keep(out, size)
            model_loss = None
            if losses:
                model_loss = tf.add_n([tf.reduce_sum(tf.cast(v, tf.float32)) for v in losses])
        targets = [t for t in tf.nest.flatten(outputs) if t is not None and t.dtype.is_floating]
        if model_loss is not None:
            targets.append(model_loss)
        return Tower(outputs, targets, model_loss, updates, tape if watch else None, trainable)

    # -- backward -----------------------------------------------------------------

    @staticmethod
    def backward(tower: Tower, upstream: list, present: tf.Tensor) -> list[Any]:
        """Tower `tower`'s gradients of the batch loss, given the loss's gradient with
        respect to its targets (`upstream`, `None` where unconnected)."""
        pairs = [(t, g) for t, g in zip(tower.targets, upstream) if g is not None]
        if not pairs:
            return [None] * len(tower.trainable)
        targets, output_gradients = zip(*pairs)
        grads = tower.tape.gradient(
            list(targets),
            tower.trainable,
            output_gradients=list(output_gradients),
            unconnected_gradients=tf.UnconnectedGradients.NONE,
        )
        # A tower that held only a stand-in row adds exactly nothing.
        return [reduce.scale(g, present) for g in grads]
