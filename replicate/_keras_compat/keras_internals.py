"""Keras internals replicate reads: tensor attributes, global state, the trainer's loss,
layers, optimizers, fit (see `replicate._keras_compat`)."""

from __future__ import annotations

import contextlib
import importlib
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import keras
import tensorflow as tf

# (major, minor) of the installed Keras, for the behaviours that changed between releases.
KERAS_VERSION = tuple(int(part) for part in keras.__version__.split(".")[:2])

# -- tensor attributes: Keras masks and the logits behind an activation -------


def _tensor_attributes() -> Any:
    try:
        return importlib.import_module("keras.src.backend.common.tensor_attributes")
    except ImportError:  # Keras < 3.6 set the attributes directly
        return None


_ATTRIBUTES = _tensor_attributes()


def get_tensor_attribute(tensor: Any, name: str) -> Any:
    """A Keras attribute of a tensor (`_keras_mask`, `_keras_logits`), or `None`.

    Keras keeps masks and the logits behind a sigmoid or softmax output as
    attributes of the output tensor (`keras.src.backend.common.
    tensor_attributes`, Keras >= 3.6; a plain attribute before).
    """
    if _ATTRIBUTES is not None:
        return _ATTRIBUTES.get_tensor_attr(tensor, name)
    return getattr(tensor, name, None)


def set_tensor_attribute(tensor: Any, name: str, value: Any) -> None:
    """Sets a Keras attribute of a tensor (see `get_tensor_attribute`)."""
    if _ATTRIBUTES is not None:
        _ATTRIBUTES.set_tensor_attr(tensor, name, value)
        return
    try:
        setattr(tensor, name, value)
    except AttributeError:
        pass


MASK = "_keras_mask"
LOGITS = "_keras_logits"


def get_mask(tensor: Any) -> Any:
    """The Keras mask of `tensor`, or `None` (Keras 3.2-3.15: `_keras_mask`)."""
    return get_tensor_attribute(tensor, MASK)


def set_mask(tensor: Any, mask: Any) -> None:
    """Sets the Keras mask of `tensor` (`None` clears it)."""
    set_tensor_attribute(tensor, MASK, mask)


def get_logits(tensor: Any) -> Any:
    """The logits Keras keeps behind a sigmoid or softmax output, or `None`.

    Keras 3.2-3.15 attach them as `_keras_logits` (`keras.activations.sigmoid`,
    `softmax`, `keras.ops.sigmoid`), and its crossentropies read them instead
    of the clipped probabilities.
    """
    return get_tensor_attribute(tensor, LOGITS)


def set_logits(tensor: Any, logits: Any) -> None:
    """Attaches `logits` to an output tensor, as Keras' activations do."""
    set_tensor_attribute(tensor, LOGITS, logits)


# -- Keras' per-thread global state -------------------------------------------


def _global_state() -> Any:
    return importlib.import_module("keras.src.backend.common.global_state")


def get_global_attribute(name: str) -> Any:
    """A Keras global (per-thread) attribute: dtype policy, seed generator, random seed.

    `keras.src.backend.common.global_state`, Keras 3.2-3.15.
    """
    return _global_state().get_global_attribute(name)


def set_global_attribute(name: str, value: Any) -> None:
    """Sets a Keras global (per-thread) attribute (see `get_global_attribute`)."""
    _global_state().set_global_attribute(name, value)


# -- the trainer's loss -------------------------------------------------------


def compiled_loss(model: keras.Model) -> Any:
    """The model's compiled loss, or `None` (`Trainer._compile_loss`, Keras 3.2-3.15)."""
    return getattr(model, "_compile_loss", None)


def loss_tracker(model: keras.Model) -> keras.metrics.Mean:
    """The `Mean` behind the `loss` Keras shows (`Trainer._loss_tracker`, Keras 3.2-3.15)."""
    return model._loss_tracker


def compute_loss(
    model: keras.Model,
    *,
    x: Any,
    y: Any,
    y_pred: Any,
    sample_weight: Any,
    training: bool,
    losses: Sequence[Any],
) -> Any:
    """The model's `compute_loss`, with `model.losses` reading `losses`.

    Keras reads `model.losses` inside `compute_loss`; replicate computes the
    model's own losses over the towers and hands them in through
    `Layer._losses_override` (Keras 3.2-3.15). `Trainer._compute_loss` (Keras
    >= 3.4) passes `training` only to overrides that accept it.
    """
    model._losses_override = list(losses)
    try:
        wrapper = getattr(model, "_compute_loss", None)
        if wrapper is not None:
            return wrapper(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training)
        return model.compute_loss(x, y, y_pred, sample_weight)
    finally:
        model._losses_override = []


# -- layers, optimizers, fit --------------------------------------------------


def is_variable(value: Any) -> bool:
    """Whether `value` is a Keras variable (`backend.common.KerasVariable`, Keras
    3.2-3.15; before 3.7 Keras' own variables are not instances of `keras.Variable`)."""
    return isinstance(value, importlib.import_module("keras.src.backend.common").KerasVariable)


def sublayers(model: keras.Layer) -> Iterator[keras.Layer]:
    """Every layer inside `model`, nested ones too (`Layer._flatten_layers`, Keras 3.2-3.15)."""
    return model._flatten_layers(include_self=False)


def route_masked_moments(layer: keras.Layer, moments: Callable[..., Any]) -> None:
    """Makes a `BatchNormalization` compute its masked batch statistics with `moments`.

    Keras computes the statistics of a masked input itself, from the calling
    replica's own samples, whatever `synchronized` says; only unmasked inputs
    reach the synchronized path (`BatchNormalization._moments(inputs, mask)` and
    `_reduction_axes`, Keras 3.2-3.15). Where `mask` is given, the layer's
    `_moments` becomes `moments(inputs, mask, axes, own)`, `own()` being Keras'
    computation; without a mask it stays Keras'. The layer keeps this (an
    instance attribute, which a deep copy carries over to the copy); a subclass
    with its own `_moments` is left alone, and a layer already routed is left as it is.
    """
    base = keras.layers.BatchNormalization
    if not isinstance(layer, base) or type(layer)._moments is not base._moments:
        return
    if "_moments" in vars(layer):
        return

    def routed(self, inputs, mask):
        if mask is None or getattr(self, "synchronized", False) is not True:
            return base._moments(self, inputs, mask)
        return moments(
            inputs, mask, self._reduction_axes, lambda: base._moments(self, inputs, mask)
        )

    object.__setattr__(layer, "_moments", types.MethodType(routed, layer))


def optimizer_variables(optimizer: keras.optimizers.Optimizer) -> list[Any]:
    """The variables an optimizer was built for (`_trainable_variables`, Keras 3.2-3.15)."""
    return list(optimizer._trainable_variables)


def set_initial_epoch(model: keras.Model, epoch: int | None) -> None:
    """Makes the next `fit` start at `epoch` (what Keras' `BackupAndRestore` sets:
    `Trainer._initial_epoch`, Keras 3.2-3.15); `None` clears it."""
    model._initial_epoch = epoch


def compiled_unbuilt(model: keras.Model) -> bool:
    """Whether `model`'s compiled metrics or compiled loss are not built yet: Keras builds
    them (creating their variables) at the first step it traces, unless a distribution
    strategy made `fit` build them first (`CompileMetrics.built`, `CompileLoss.built`,
    Keras 3.2-3.15)."""
    return any(
        getattr(model, attribute, None) is not None and not getattr(model, attribute).built
        for attribute in ("_compile_metrics", "_compile_loss")
    )


def symbolic_build(model: keras.Model, data_batch: Any) -> None:
    """Builds `model` (its layers, compiled loss and metrics, optimizer) from one batch,
    as Keras' `fit` does before its first step (`Trainer._symbolic_build`, Keras 3.2-3.15)."""
    model._symbolic_build(data_batch=data_batch)


@contextlib.contextmanager
def any_batch_size(layers: Sequence[keras.Layer]) -> Iterator[None]:
    """Lets stateful RNN `layers` run on a tower's rows of their state.

    A stateful RNN checks each batch's static size against the batch its
    state was built for (`RNN._expected_batch_size`, Keras >= 3.12; earlier
    releases do not check), and assigning its new state checks the state
    variable's shape (`Variable._shape`, Keras 3.2-3.15); a tower holds part
    of those rows. Both are relaxed for the duration (the batch dimension
    becomes `None`) and restored after.
    """
    saved = []
    for layer in layers:
        variables = [v for v in tf.nest.flatten(layer.states) if is_variable(v)]
        checks = hasattr(layer, "_expected_batch_size")
        expected = layer._expected_batch_size if checks else None
        saved.append((layer, checks, expected, [(v, v._shape) for v in variables]))
        if checks:
            layer._expected_batch_size = None
        for v in variables:
            v._shape = (None, *v._shape[1:])
    try:
        yield
    finally:
        for layer, checks, expected, shapes in saved:
            if checks:
                layer._expected_batch_size = expected
            for v, shape in shapes:
                v._shape = shape
