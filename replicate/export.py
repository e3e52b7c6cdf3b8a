"""Export for TensorFlow Serving: a versioned SavedModel, written whole or not at all,
by the chief process alone."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from replicate import writers

_VERSION = re.compile(r"^[0-9]+$")


def _template(model: Any) -> keras.Model:
    from replicate.model import ReplicatedModel

    if isinstance(model, ReplicatedModel):
        return model.template
    if not isinstance(model, keras.Model):
        raise TypeError(
            "`model` must be a Keras model or a ReplicatedModel. Received: "
            f"model={model!r} of type {type(model).__name__}"
        )
    if not model.built or not model.inputs:
        raise ValueError(
            f"The model {model.name!r} has no known inputs to export a signature for. "
            "Export a functional or Sequential model that starts with `keras.Input`."
        )
    return model


def _names(tensors: list[Any], prefix: str) -> list[str]:
    names = []
    for i, t in enumerate(tensors):
        name = getattr(t, "name", None) or f"{prefix}_{i}"
        name = re.sub(r"[^A-Za-z0-9_]", "_", name.split(":")[0])
        names.append(name if name not in names else f"{name}_{i}")
    return names


class _Named:
    def __init__(self, name: str) -> None:
        self.name = name


def _is_classifier(model: keras.Model) -> bool:
    if len(model.outputs) != 1:
        return False
    shape = model.outputs[0].shape
    return len(shape) == 2 and shape[-1] is not None and shape[-1] > 1


def _outputs_are_probabilities(model: keras.Model) -> bool:
    layer = model.layers[-1] if model.layers else None
    activation = getattr(layer, "activation", None)
    return (
        activation in (keras.activations.softmax,)
        or getattr(activation, "__name__", "") == "softmax"
    )


def next_version(export_base: str | os.PathLike) -> int:
    """One more than the largest numeric version under `export_base` (1 if none)."""
    base = Path(export_base)
    existing = (
        [int(p.name) for p in base.iterdir() if p.is_dir() and _VERSION.match(p.name)]
        if (base.is_dir())
        else []
    )
    return max(existing, default=0) + 1


def export_saved_model(
    model: Any,
    export_base: str | os.PathLike,
    *,
    version: int | None = None,
    overwrite: bool = False,
    classify: bool | None = None,
) -> str | None:
    """Writes `model` as a SavedModel that TensorFlow Serving loads.

    The model is exported in inference mode (Dropout off, BatchNormalization
    on its moving statistics) to `export_base/<version>/`, the layout
    TensorFlow Serving watches. It is written to a temporary folder beside
    the target and renamed into place, so a failure leaves no half-written
    version (and, with `overwrite=True`, the old version stays until the new
    one is complete).

    Across processes, pass the `ReplicatedModel` and call this on every
    process: only the chief chooses the version and writes it, the others
    wait until it is complete, and every process returns the same path
    (`replicate.writers.on_chief`). Inside `fit` (from a callback) the chief
    writes alone and the other processes return `None`. A plain Keras model
    is written by whichever process calls this.

    Signatures:
        `serving_default`: named inputs (the model's input names) to named
            outputs (its output names).
        `classify` (classifiers: one output of shape `(batch, classes)`):
            `classes` (int64 top class) and `scores` (class probabilities;
            softmax is applied unless the last layer already is one).

    Args:
        model: A Keras model, or a `ReplicatedModel` (its template is exported).
        export_base: The folder that holds the numbered versions.
        version: A positive integer. Defaults to the next free number.
        overwrite: Replace an existing version. Defaults to `False`.
        classify: Add the `classify` signature; `None` decides from the
            output shape.

    Returns:
        The path of the written version folder.

    Raises:
        TypeError: If `model` is not a Keras model.
        ValueError: For a version that is not a positive integer, or a model
            without known inputs.
        FileExistsError: If the version exists and `overwrite` is `False`.
        RuntimeError: On the other processes, if the chief's export failed.
    """
    template = _template(model)
    if version is not None and (
        isinstance(version, bool) or not isinstance(version, int) or version < 1
    ):
        raise ValueError(
            "`version` must be a positive integer (TensorFlow Serving reads numbered "
            f"folders). Received: version={version!r}"
        )

    def write() -> int:
        return _export(template, Path(export_base), version, overwrite, classify)

    from replicate.model import ReplicatedModel

    if isinstance(model, ReplicatedModel):
        written = writers.on_chief(model, "export", write)
        return None if written is None else str(Path(export_base) / str(written))
    return str(Path(export_base) / str(write()))


def _export(
    template: keras.Model, base: Path, version: int | None, overwrite: bool, classify: Any
) -> int:
    """Writes version `version` (default: the next free one) under `base`; returns it."""
    if version is None:
        version = next_version(base)
    target = base / str(version)
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"Version {version} already exists at {str(target)!r}. Pass overwrite=True to "
            "replace it, or version=None for the next free number "
            f"({next_version(base)})."
        )
    base.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.partial-", dir=base))
    try:
        _write(template, staging / "model", classify)
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{version}.old-", dir=base))
            os.replace(target, retired / "model")
            os.replace(staging / "model", target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging / "model", target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return version


def _output_names(model: keras.Model) -> list[str]:
    """The name of the layer that makes each output (a Sequential's last layer too)."""
    layers = []
    for output in model.outputs:
        history = getattr(output, "_keras_history", None)
        layers.append(_Named(history.operation.name) if history is not None else output)
    return _names(layers, "output")


def _write(model: keras.Model, path: Path, classify: bool | None) -> None:
    input_names = _names(model.inputs, "input")
    output_names = _output_names(model)
    specs = [
        tf.TensorSpec(t.shape, t.dtype, name=name)
        for t, name in zip(model.inputs, input_names, strict=True)
    ]

    def predict(*inputs):
        args = inputs[0] if len(inputs) == 1 else list(inputs)
        outputs = model(args, training=False)
        flat = tf.nest.flatten(outputs)
        return dict(zip(output_names, flat, strict=True))

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", predict, input_signature=specs)
    if classify if classify is not None else _is_classifier(model):
        if not _is_classifier(model):
            raise ValueError(
                "classify=True needs a model with one output of shape (batch, classes). "
                f"Received outputs of shapes {[tuple(o.shape) for o in model.outputs]}."
            )
        probabilities = _outputs_are_probabilities(model)

        def classify_fn(*inputs):
            args = inputs[0] if len(inputs) == 1 else list(inputs)
            scores = model(args, training=False)
            if not probabilities:
                scores = tf.nn.softmax(scores, axis=-1)
            return {"classes": tf.argmax(scores, axis=-1), "scores": scores}

        archive.add_endpoint("classify", classify_fn, input_signature=specs)
    archive.write_out(str(path), verbose=False)
